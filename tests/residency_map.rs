//! The residency map (`federation policy check --format html`, `policy map
//! --format svg`) as a real browser renders it: headless Chromium (Debian's
//! `chromium`, installed by `.ci/run`) loads the files the CLI wrote, and
//! the test asserts on the rendered DOM, on the SVG parsing as XML, and on
//! the page printing to PDF.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is installed (`.ci/run` installs Debian's chromium package)")
}

/// Runs `cmd` to completion within two minutes (killed past that); its
/// stdout.
fn run_bounded(mut cmd: Command) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawns");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader")
}

struct Browser {
    dir: PathBuf,
}

impl Browser {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("federation-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        Self { dir }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            self.dir.join("profile").display()
        ));
        cmd
    }

    fn dom(&self, file: &Path) -> String {
        let mut cmd = self.command();
        cmd.arg("--dump-dom")
            .arg(format!("file://{}", file.display()));
        run_bounded(cmd)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the CLI; its exit code and stdout.
fn federation(args: &[&str]) -> (i32, String) {
    let out = Command::new(federation_exe())
        .args(args)
        .output()
        .expect("federation runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn seed_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/policies/seed-federation.yaml").to_string()
}

#[test]
fn the_seed_map_renders_in_a_browser_with_its_regions_and_warning_edges() {
    let browser = Browser::new("residency-map");
    let (code, html) = federation(&["policy", "check", &seed_path(), "--format", "html"]);
    // The seed has warnings, no error: exit 0 as for text.
    assert_eq!(code, 0, "{html}");
    let page = browser.dir.join("map.html");
    std::fs::write(&page, &html).expect("write");
    let dom = browser.dom(&page);
    assert!(dom.contains("<svg"), "no SVG rendered:\n{dom}");
    for region in ["north_america", "europe", "asia_pacific"] {
        assert!(
            dom.contains(&format!("data-region=\"{region}\"")),
            "rendered map lacks region {region}:\n{dom}"
        );
    }
    // Both failovers of the seed drop a tag: two warning edges in the
    // picture, each labelled, and two in the list.
    for (from, to, tag) in [
        ("north_america", "europe", "HIPAA"),
        ("europe", "north_america", "GDPR"),
    ] {
        let edge = format!(
            "<g class=\"edge drops-tag\" data-step=\"1\" data-from=\"{from}\" data-to=\"{to}\"><title>failover 1: drops {tag}</title>"
        );
        assert!(dom.contains(&edge), "rendered map lacks `{edge}`:\n{dom}");
    }
    assert!(dom.contains(">drops GDPR</text>") && dom.contains(">drops HIPAA</text>"));
    assert_eq!(
        dom.matches("<li class=\"warning drops-tag\"").count(),
        2,
        "{dom}"
    );
    assert_eq!(dom.matches("<li class=\"uncovered\"").count(), 2, "{dom}");
    assert!(
        dom.contains("no rule routes here"),
        "asia_pacific is unreached"
    );

    // It prints (the print styles apply; the PDF is written).
    let pdf = browser.dir.join("map.pdf");
    let mut cmd = browser.command();
    cmd.arg("--no-pdf-header-footer")
        .arg(format!("--print-to-pdf={}", pdf.display()))
        .arg(format!("file://{}", page.display()));
    run_bounded(cmd);
    let bytes = std::fs::read(&pdf).expect("PDF written");
    assert!(bytes.starts_with(b"%PDF"), "not a PDF");
}

#[test]
fn the_svg_is_well_formed_xml_even_with_markup_in_the_policy() {
    let browser = Browser::new("residency-svg");
    let hostile = SEED.replace(
        "Global Enterprise Federation",
        "R&D <b>\\\"ops\\\"</b> & co",
    );
    let file = browser.dir.join("hostile.yaml");
    std::fs::write(&file, hostile).expect("write");
    let (code, svg) = federation(&[
        "policy",
        "map",
        file.to_str().expect("utf-8"),
        "--format",
        "svg",
    ]);
    assert_eq!(code, 0, "{svg}");
    let image = browser.dir.join("map.svg");
    std::fs::write(&image, &svg).expect("write");
    // Chromium opens an .svg as XML: a markup mistake becomes a
    // <parsererror> page instead of the picture.
    let dom = browser.dom(&image);
    assert!(
        !dom.contains("parsererror"),
        "the SVG is not well-formed:\n{dom}"
    );
    assert!(
        dom.contains("Residency map: R&amp;D &lt;b&gt;\"ops\"&lt;/b&gt; &amp; co"),
        "{dom}"
    );
    assert!(dom.contains("data-region=\"europe\""), "{dom}");
    // The same document with one bad ampersand is refused: the check can fail.
    let broken = browser.dir.join("broken.svg");
    std::fs::write(&broken, svg.replacen("R&amp;D", "R&D", 1)).expect("write");
    assert!(browser.dom(&broken).contains("parsererror"));
}
