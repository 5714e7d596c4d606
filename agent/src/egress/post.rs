//! One JSON POST to a webhook (approvals, audit events): HTTP/1.1 over a tagged socket, TLS
//! with the given client configuration for `https`, the whole exchange within a deadline and
//! at most 64 KiB of the answer read (its body is not needed, only its status).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

use super::EgressError;
use crate::kernel::OwnSockets;

/// How much of a webhook's answer is read before it is dropped.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("the URL has no host")]
    NoHost,
    #[error(transparent)]
    Dial(#[from] EgressError),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP with {host}: {source}")]
    Http {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot build the request: {0}")]
    Request(#[source] http::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// POST `body` (JSON) to `uri` (http, or https with `tls`; `authorization` when given) from a
/// socket tagged with `own`, within `timeout`; `Ok` for a 2xx answer.
pub async fn post_json(
    uri: &http::Uri,
    own: &OwnSockets,
    body: Bytes,
    tls: Arc<rustls::ClientConfig>,
    authorization: Option<&http::HeaderValue>,
    timeout: Duration,
) -> Result<(), PostError> {
    tokio::time::timeout(
        timeout,
        exchange(uri, own, body, tls, authorization, timeout),
    )
    .await
    .map_err(|_| PostError::Timeout(timeout))?
}

async fn exchange(
    uri: &http::Uri,
    own: &OwnSockets,
    body: Bytes,
    tls: Arc<rustls::ClientConfig>,
    authorization: Option<&http::HeaderValue>,
    timeout: Duration,
) -> Result<(), PostError> {
    let host = uri.host().ok_or(PostError::NoHost)?.to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = super::dial(Some(own), bare, port, timeout, "the webhook's timeout").await?;
    let authority = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut req = http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a.clone());
    }
    let req = req.body(Full::new(body)).map_err(PostError::Request)?;
    let status = if https {
        let name = rustls_pki_types::ServerName::try_from(bare.to_owned())
            .map_err(|_| PostError::ServerName(bare.to_owned()))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| PostError::Tls {
                host: host.clone(),
                source,
            })?;
        send(stream, req, &host).await?
    } else {
        send(tcp, req, &host).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status(status))
    }
}

/// One request on a fresh HTTP/1.1 connection; its status (the body read, bounded, and dropped).
async fn send<S>(
    io: S,
    req: http::Request<Full<Bytes>>,
    host: &str,
) -> Result<http::StatusCode, PostError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| PostError::Http {
        host: host.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        // The answer's head is bounded as an upstream's is.
        .max_buf_size(64 * 1024)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(http)?;
    // The connection is driven here, alongside the exchange: one task.
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let _ = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await;
        Ok(status)
    };
    tokio::pin!(connection, exchange);
    let mut driving = true;
    loop {
        tokio::select! {
            biased;
            status = &mut exchange => return status,
            // A connection that ends cleanly has delivered what it had: the exchange then
            // finishes (or fails) on its own.
            ended = &mut connection, if driving => {
                driving = false;
                ended.map_err(http)?;
            }
        }
    }
}
