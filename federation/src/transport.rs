//! Network plumbing: serving gRPC on an already-bound listener (with
//! TCP_NODELAY: without it Nagle plus delayed ACK costs ~40 ms a call) and a
//! cache of client channels to peer controllers, each call bounded by a
//! deadline. With TLS, a peer channel is bound to the region it is meant to
//! reach: the handshake refuses a certificate naming another region.
//! Knows nothing of routing or tasks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Builds the server-side incoming stream from a bound listener, with
/// TCP_NODELAY on every accepted connection.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Lazily connected channels to peer controllers, by endpoint URL.
#[derive(Debug, Default)]
pub struct Channels {
    connect_timeout: Duration,
    cache: Mutex<HashMap<String, Channel>>,
}

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
#[error("bad endpoint `{endpoint}`: {why}")]
pub struct EndpointError {
    /// The endpoint as configured.
    pub endpoint: String,
    /// What is wrong with it.
    pub why: String,
}

impl Channels {
    /// A cache whose connections give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The channel for `endpoint`, created on first use. Connection happens on
    /// the first call and is retried by the channel after failures.
    pub fn get(&self, endpoint: &str) -> Result<Channel, EndpointError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(endpoint) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| EndpointError {
                endpoint: endpoint.to_string(),
                why: e.to_string(),
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        cache.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    /// The mutual-TLS channel to `region` at `endpoint`, created on first
    /// use; the server's certificate must name `region` (else the handshake
    /// fails and the refusal is logged). `on_verified` learns each verified
    /// certificate's identity.
    pub fn get_tls(
        &self,
        endpoint: &str,
        region: &str,
        tls: &federation_tls::ClientTls,
        on_verified: federation_tls::OnVerified,
    ) -> Result<Channel, EndpointError> {
        let key = format!("{region}|{endpoint}");
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let connect_timeout = self.connect_timeout;
        let channel = tls
            .channel(
                endpoint,
                federation_tls::Expect::Region(region.to_string()),
                Some(on_verified),
                |ep| {
                    ep.connect_timeout(connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5))
                },
            )
            .map_err(|e| EndpointError {
                endpoint: endpoint.to_string(),
                why: e.to_string(),
            })?;
        cache.insert(key, channel.clone());
        Ok(channel)
    }

    /// Drops the cached channels for `endpoint`, plaintext and TLS (after
    /// an endpoint change).
    pub fn forget(&self, endpoint: &str) {
        let suffix = format!("|{endpoint}");
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|key, _| key != endpoint && !key.ends_with(&suffix));
    }
}

/// Wraps a message in a request with a deadline.
pub fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(deadline);
    req
}
