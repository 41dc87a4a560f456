//! Who may call what. Callers authenticate with a client certificate
//! (verified by [`federation_tls::server`]; its identity URI gives the role)
//! or a bearer token (`authorization: Bearer <token>`, from the token file:
//! one `token role [region]` per line). Each of the four gRPC services is
//! wrapped in [`Authed`], a tower layer that checks the caller's role for the
//! method before the handler runs and puts the [`Caller`] in the request
//! extensions (peer handlers check it against the region a message claims).
//!
//! | Role | May call |
//! |---|---|
//! | client | SubmitTask, GetTask, WatchTask, CancelTask, ExplainRoute, ListTasks |
//! | agent | the agent service, in its own region only |
//! | operator | everything a client may, and the admin service |
//! | auditor | FederationStatus, ExplainRoute, GetTask |
//! | peer | the peer service only (controller certificates) |
//!
//! Missing or unknown credentials: `UNAUTHENTICATED`; a role that may not
//! call the method: `PERMISSION_DENIED` naming the roles needed. Only with
//! `--insecure` (plaintext) does a caller without credentials get through.
//!
//! Owns authentication and authorization only; never logs tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use federation_tls::{ConnInfo, Identity, Role};
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::server::NamedService;

use crate::error::Error;

/// The authenticated caller of a request, in its extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

/// Why a token file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unreadable.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line that is not `token role [region]`.
    #[error("{path}:{line}: {why}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Bearer tokens by SHA-256 (the tokens themselves are not kept).
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Identity>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Parses a token file: `token role [region]` per line, `#` comments.
    /// Agent tokens need a region; peers authenticate by certificate only.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TokenError> {
        let mut by_hash = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| TokenError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                why,
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (token, role, region) = match fields.as_slice() {
                [t, r] => (*t, *r, None),
                [t, r, g] => (*t, *r, Some(g.to_string())),
                _ => return Err(bad("expected `token role [region]`".into())),
            };
            if token.len() < 16 {
                return Err(bad("token shorter than 16 characters".into()));
            }
            let role = Role::parse(role).ok_or_else(|| {
                bad(format!(
                    "unknown role `{role}` (client, agent, operator, auditor)"
                ))
            })?;
            match (role, &region) {
                (Role::Peer, _) => {
                    return Err(bad(
                        "peers authenticate with their region certificate, not a token".into(),
                    ));
                }
                (Role::Agent, None) => return Err(bad("an agent token needs a region".into())),
                _ => {}
            }
            let identity = Identity {
                role,
                name: format!("token-line-{}", i + 1),
                region: if role == Role::Agent { region } else { None },
                tags: Default::default(),
            };
            if by_hash.insert(digest(token), identity).is_some() {
                return Err(bad("token listed twice".into()));
            }
        }
        Ok(Self { by_hash })
    }

    /// Loads a token file.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The identity of a token, when the file lists it.
    pub fn lookup(&self, token: &str) -> Option<&Identity> {
        self.by_hash.get(&digest(token))
    }
}

/// The roles that may call a gRPC method, by its path; `None` for a path
/// outside our four services.
pub fn roles_for(path: &str) -> Option<&'static [Role]> {
    use Role::*;
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("federation.v1.FederationClient", "ExplainRoute" | "GetTask") => {
            &[Client, Operator, Auditor]
        }
        ("federation.v1.FederationClient", _) => &[Client, Operator],
        ("federation.v1.FederationPeer", _) => &[Peer],
        ("federation.v1.RegionAgentApi", _) => &[Agent],
        ("federation.v1.FederationAdmin", "FederationStatus" | "ListDecisions") => {
            &[Operator, Auditor]
        }
        ("federation.v1.FederationAdmin", _) => &[Operator],
        _ => return None,
    })
}

/// The policy of one controller: its region, the tokens, and whether
/// unauthenticated callers are let through (plaintext `--insecure` only).
#[derive(Debug, Clone)]
pub struct Auth {
    /// This controller's region.
    pub region: String,
    /// Bearer tokens.
    pub tokens: Tokens,
    /// Let callers without credentials through (plaintext mode).
    pub insecure: bool,
}

impl Auth {
    /// Authenticates and authorizes a call to `path`.
    pub fn check(
        &self,
        path: &str,
        extensions: &http::Extensions,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, Error> {
        let from_cert = extensions
            .get::<ConnInfo>()
            .and_then(|c| c.identity.clone());
        let identity = match from_cert {
            Some(id) => Some(id),
            None => self.token_identity(headers)?,
        };
        let Some(id) = identity else {
            if self.insecure {
                return Ok(None);
            }
            return Err(Error::Unauthenticated(
                "no credentials: present a client certificate of the federation or a bearer token"
                    .into(),
            ));
        };
        let method = path.rsplit('/').next().unwrap_or(path);
        let roles = roles_for(path).unwrap_or(&[Role::Operator]);
        if !roles.contains(&id.role) {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(Error::Denied(format!(
                "{method} needs role {}; {id} has role {}",
                names.join(" or "),
                id.role
            )));
        }
        match id.role {
            Role::Agent if id.region.as_deref() != Some(self.region.as_str()) => {
                return Err(Error::Denied(format!(
                    "{method}: {id} may only call its own region's controller, this is `{}`",
                    self.region
                )));
            }
            // A replica of this region passes a draining replica's task on
            // to its sibling (`ForwardTask` with `relayed_by`, checked by
            // the handler); every other peer call from our own region is
            // refused.
            Role::Peer
                if id.region.as_deref() == Some(self.region.as_str())
                    && method != "ForwardTask" =>
            {
                return Err(Error::Denied(format!(
                    "{method}: {id} claims this controller's own region"
                )));
            }
            _ => {}
        }
        Ok(Some(Caller(id)))
    }

    fn token_identity(&self, headers: &http::HeaderMap) -> Result<Option<Identity>, Error> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Error::Unauthenticated("authorization header is not `Bearer <token>`".into())
            })?;
        match self.tokens.lookup(token) {
            Some(id) => Ok(Some(id.clone())),
            None => Err(Error::Unauthenticated("unknown bearer token".into())),
        }
    }
}

/// A gRPC service behind the auth check. It also turns tonic's
/// "message too large" (`OUT_OF_RANGE`) into `RESOURCE_EXHAUSTED` naming the
/// `max_message_bytes` limit, like every other limit.
#[derive(Debug, Clone)]
pub struct Authed<S> {
    inner: S,
    auth: Arc<Auth>,
    max_message_bytes: usize,
}

impl<S> Authed<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, auth: Arc<Auth>, max_message_bytes: usize) -> Self {
        Self {
            inner,
            auth,
            max_message_bytes,
        }
    }
}

/// Rewrites a trailers-only `OUT_OF_RANGE` "message length too large" answer.
fn name_message_limit(resp: http::Response<Body>, max: usize) -> http::Response<Body> {
    let headers = resp.headers();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if out_of_range && too_large {
        let status: tonic::Status = Error::limit(
            "message",
            format!("request larger than max_message_bytes ({max} bytes)"),
        )
        .into();
        return status.into_http();
    }
    resp
}

impl<S: NamedService> NamedService for Authed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Authed<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        match self
            .auth
            .check(req.uri().path(), req.extensions(), req.headers())
        {
            Ok(caller) => {
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                // The clone is ready-less; swap so the polled one is used.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let max = self.max_message_bytes;
                Box::pin(async move {
                    let resp = inner.call(req).await?;
                    Ok(name_message_limit(resp, max))
                })
            }
            Err(e) => {
                let remote = req
                    .extensions()
                    .get::<ConnInfo>()
                    .and_then(|c| c.remote)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::warn!(path = %req.uri().path(), %remote, reason = %e, "call refused");
                let status: tonic::Status = e.into();
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_errors_name_the_line() {
        let p = Path::new("tokens");
        let err = Tokens::parse(p, "# c\nabcdefghijklmnopq client\nshort client\n")
            .expect_err("short token");
        assert!(err.to_string().contains("tokens:3"), "{err}");
        let err = Tokens::parse(p, "abcdefghijklmnopq agent\n").expect_err("agent region");
        assert!(err.to_string().contains("region"), "{err}");
        let err = Tokens::parse(p, "abcdefghijklmnopq peer europe\n").expect_err("peer");
        assert!(err.to_string().contains("certificate"), "{err}");
        let ok = Tokens::parse(p, "abcdefghijklmnopq agent europe\n").expect("ok");
        let id = ok.lookup("abcdefghijklmnopq").expect("found");
        assert_eq!(id.role, Role::Agent);
        assert_eq!(id.region.as_deref(), Some("europe"));
    }

    #[test]
    fn roles_by_method() {
        assert!(
            roles_for("/federation.v1.FederationAdmin/Drain")
                .expect("known")
                .contains(&Role::Operator)
        );
        assert!(
            !roles_for("/federation.v1.FederationAdmin/Drain")
                .expect("known")
                .contains(&Role::Auditor)
        );
        assert_eq!(
            roles_for("/federation.v1.FederationPeer/Advertise"),
            Some(&[Role::Peer][..])
        );
        assert_eq!(roles_for("/grpc.health.v1.Health/Check"), None);
    }
}
