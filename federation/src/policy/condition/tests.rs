//! Unit tests of the compiled evaluator, and property tests holding it to the
//! `cel` crate's interpreter.

use proptest::prelude::*;

use super::*;

fn attrs(pairs: &[(&str, AttrValue)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.to_string())
}

fn both(src: &str, a: &Attributes) -> (Result<bool, String>, Result<bool, String>) {
    let c = Condition::compile(src).expect("compiles");
    (c.evaluate(a), c.interpret(a))
}

fn agree(src: &str, a: &Attributes) -> Result<bool, String> {
    let (x, y) = both(src, a);
    assert_eq!(x.is_ok(), y.is_ok(), "{src} on {a:?}: {x:?} vs {y:?}");
    if let (Ok(p), Ok(q)) = (&x, &y) {
        assert_eq!(p, q, "{src} on {a:?}");
    }
    x
}

#[test]
fn user_conditions_compile_to_the_ir() {
    for src in [
        "customer_region == 'US' || customer_region == 'CA'",
        "customer_region in ['UK', 'DE', 'FR']",
    ] {
        let c = Condition::compile(src).expect("compiles");
        assert!(c.ir().is_some(), "{src}");
    }
}

#[test]
fn evaluates_the_user_rules() {
    let de = attrs(&[("customer_region", s("DE"))]);
    assert_eq!(
        agree("customer_region in ['UK', 'DE', 'FR']", &de),
        Ok(true)
    );
    assert_eq!(
        agree("customer_region == 'US' || customer_region == 'CA'", &de),
        Ok(false)
    );
}

#[test]
fn missing_attribute_is_an_error() {
    let empty = Attributes::new();
    let r = agree("customer_region == 'US'", &empty);
    assert!(r.expect_err("missing").contains("customer_region"));
}

#[test]
fn error_propagation_matches_the_interpreter() {
    let empty = Attributes::new();
    assert_eq!(agree("true || missing", &empty), Ok(true));
    assert_eq!(agree("missing || true", &empty), Ok(true));
    assert!(agree("missing || false", &empty).is_err());
    assert_eq!(agree("missing && false", &empty), Ok(false));
    assert_eq!(agree("false && missing", &empty), Ok(false));
    assert!(agree("true && missing", &empty).is_err());
    assert!(agree("missing ? true : false", &empty).is_err());
}

#[test]
fn heterogeneous_equality_matches_the_interpreter() {
    let a = attrs(&[
        ("i", AttrValue::Int(1)),
        ("d", AttrValue::Double(1.0)),
        ("s", s("a")),
        ("l", AttrValue::List(vec![s("a"), AttrValue::Int(2)])),
    ]);
    assert_eq!(agree("i == d", &a), Ok(true));
    assert_eq!(agree("1 == 1.0", &a), Ok(true));
    assert_eq!(agree("s == i", &a), Ok(false));
    assert_eq!(agree("s != i", &a), Ok(true));
    assert!(agree("s < i", &a).is_err());
    assert_eq!(agree("i < 2.5", &a), Ok(true));
    assert_eq!(agree("2.0 in l", &a), Ok(true));
    assert_eq!(agree("l == ['a', 2.0]", &a), Ok(true));
    assert!(agree("s in i", &a).is_err());
    assert_eq!(agree("size(s) == 1 && l.size() == 2", &a), Ok(true));
    assert!(agree("size(i) == 1", &a).is_err());
    assert_eq!(agree("s.startsWith('a') && s.endsWith('a')", &a), Ok(true));
    assert!(agree("i.startsWith('a')", &a).is_err());
    assert!(agree("!s", &a).is_err());
    assert!(agree("s", &a).is_err());
}

#[test]
fn constructs_outside_the_ir_use_the_interpreter() {
    let a = attrs(&[("s", s("DE-1")), ("i", AttrValue::Int(4))]);
    for (src, want) in [
        ("s.matches('^DE')", true),
        ("i + 1 == 5", true),
        ("[1, 2].exists(x, x == 2)", true),
        ("int('4') == i", true),
    ] {
        let c = Condition::compile(src).expect("compiles");
        assert!(c.ir().is_none(), "{src}");
        assert_eq!(c.evaluate(&a), Ok(want), "{src}");
    }
}

#[test]
fn static_errors_have_offsets() {
    let cases = [
        ("'US'", 0, "not a boolean"),
        ("customer_region in 'US'", 19, "not a list"),
        ("customer_region == 'US' && 'a' == 1", 31, "always false"),
        ("'a' < 1", 4, "cannot order"),
        ("frobnicate(customer_region)", 10, "unknown function"),
        ("customer_region == ", 19, ""),
        ("1 + 2", 0, "not a boolean"),
        ("x && 'a'", 5, "not a boolean"),
    ];
    for (src, offset, msg) in cases {
        let e = Condition::compile(src).expect_err(src);
        assert!(e.message.contains(msg), "{src}: {e:?}");
        assert_eq!(e.offset, offset, "{src}: {e:?}");
    }
}

#[test]
fn valid_conditions_are_not_static_errors() {
    for src in [
        "x == 1",
        "x in y",
        "x < 'a'",
        "1 == 1.0",
        "a ? b : c",
        "size(x) > 0",
        "has(x.y)",
        "x.contains('a') || !y",
    ] {
        Condition::compile(src).expect(src);
    }
}

// ---------------------------------------------------------------------------
// Property tests: the compiled evaluator agrees with the interpreter.

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("c".to_string()),
        Just("'US'".to_string()),
        Just("'DE'".to_string()),
        Just("''".to_string()),
        Just("1".to_string()),
        Just("2".to_string()),
        Just("1.0".to_string()),
        Just("2.5".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
        Just("['US', 'DE']".to_string()),
        Just("[1, 2.0, 'x']".to_string()),
        Just("[]".to_string()),
    ]
}

fn expr() -> impl Strategy<Value = String> {
    leaf().prop_recursive(4, 32, 3, |inner| {
        let op = prop_oneof![
            Just("=="),
            Just("!="),
            Just("<"),
            Just("<="),
            Just(">"),
            Just(">="),
            Just("in"),
            Just("&&"),
            Just("||"),
        ];
        prop_oneof![
            (inner.clone(), op, inner.clone()).prop_map(|(l, o, r)| format!("({l} {o} {r})")),
            inner.clone().prop_map(|x| format!("!{x}")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
            inner.clone().prop_map(|x| format!("size({x})")),
            (inner.clone(), inner.clone()).prop_map(|(x, y)| format!("{x}.startsWith({y})")),
            (inner.clone(), inner.clone()).prop_map(|(x, y)| format!("{x}.contains({y})")),
            (inner.clone(), inner).prop_map(|(x, y)| format!("[{x}, {y}]")),
        ]
    })
}

fn scalar() -> impl Strategy<Value = AttrValue> {
    prop_oneof![
        prop_oneof![Just("US"), Just("DE"), Just(""), Just("x")]
            .prop_map(|v| AttrValue::Str(v.to_string())),
        (-2i64..3).prop_map(AttrValue::Int),
        prop_oneof![Just(1.0), Just(2.5), Just(-0.0), Just(f64::NAN)].prop_map(AttrValue::Double),
        any::<bool>().prop_map(AttrValue::Bool),
    ]
}

fn value() -> impl Strategy<Value = AttrValue> {
    prop_oneof![
        3 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(AttrValue::List),
    ]
}

fn attributes() -> impl Strategy<Value = Attributes> {
    (
        prop::option::of(value()),
        prop::option::of(value()),
        prop::option::of(value()),
    )
        .prop_map(|(a, b, c)| {
            let mut m = Attributes::new();
            for (k, v) in [("a", a), ("b", b), ("c", c)] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn compiled_agrees_with_interpreter(src in expr(), attrs in attributes()) {
        // Statically rejected conditions never reach evaluation.
        let Ok(c) = Condition::compile(&src) else { return Ok(()); };
        let x = c.evaluate(&attrs);
        let y = c.interpret(&attrs);
        prop_assert_eq!(x.is_ok(), y.is_ok(), "{} on {:?}: {:?} vs {:?}", src, attrs, x, y);
        if let (Ok(p), Ok(q)) = (&x, &y) {
            prop_assert_eq!(p, q, "{} on {:?}", src, attrs);
        }
    }

    #[test]
    fn first_match_agrees_with_interpreter(
        srcs in prop::collection::vec(expr(), 1..6),
        attrs in attributes(),
    ) {
        let rules: Vec<Condition> = srcs.iter().filter_map(|s| Condition::compile(s).ok()).collect();
        let compiled = rules.iter().position(|c| c.evaluate(&attrs) == Ok(true));
        let reference = rules.iter().position(|c| c.interpret(&attrs) == Ok(true));
        prop_assert_eq!(compiled, reference, "{:?} on {:?}", srcs, attrs);
    }
}

#[test]
fn offsets_count_characters_not_bytes() {
    // 'é' is two bytes; the offset of 'US' is in characters.
    let e = Condition::compile("r == 'é' && r in 'US'").expect_err("not a list");
    assert_eq!(e.offset, 17, "{e:?}");
    let e = Condition::compile("r == 'é' && r == = 'US'").expect_err("syntax");
    assert_eq!(e.offset, 17, "{e:?}");
}
