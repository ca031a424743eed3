//! One listener for every protocol: requests whose content type is
//! `application/grpc*` go to tonic (gRPC-Web ones through `tonic-web`
//! first, which turns them into gRPC), everything else to the HTTP JSON
//! API's router (`crate::http`). So gRPC, gRPC-Web and JSON share one
//! port, one TLS configuration and one set of keys; admission (which
//! sits inside, around tonic's routes) checks the gRPC calls, the HTTP
//! handlers check their own, through the same key ring.
//!
//! Browsers need CORS for gRPC-Web too: with `--http-cors-origin`,
//! gRPC-Web responses get the same policy as the JSON API's, and every
//! preflight (`OPTIONS`, which carries no gRPC content type) reaches the
//! router, whose CORS layer answers it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tower_http::cors::CorsLayer;
use tower_layer::Layer;
use tower_service::Service;

/// The layer; see the module docs.
#[derive(Clone)]
pub(crate) struct SplitLayer {
    router: axum::Router,
    cors: Option<CorsLayer>,
}

impl SplitLayer {
    /// Non-gRPC requests go to `router`; gRPC-Web responses get `cors`.
    pub(crate) fn new(router: axum::Router, cors: Option<CorsLayer>) -> SplitLayer {
        SplitLayer { router, cors }
    }
}

impl<S> Layer<S> for SplitLayer {
    type Service = Split<S>;

    fn layer(&self, grpc: S) -> Split<S> {
        Split {
            grpc,
            router: self.router.clone(),
            cors: self.cors.clone(),
        }
    }
}

/// The service in front of tonic's routes.
#[derive(Clone)]
pub(crate) struct Split<S> {
    grpc: S,
    router: axum::Router,
    cors: Option<CorsLayer>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Which way a request goes.
#[derive(Debug, PartialEq)]
enum Route {
    Grpc,
    GrpcWeb,
    Http,
}

fn route<B>(request: &http::Request<B>) -> Route {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/grpc-web") {
        Route::GrpcWeb
    } else if content_type.starts_with("application/grpc") {
        Route::Grpc
    } else {
        Route::Http
    }
}

impl<S> Service<http::Request<Body>> for Split<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's rule).
        let clone = self.grpc.clone();
        let mut grpc = std::mem::replace(&mut self.grpc, clone);
        match route(&request) {
            Route::Grpc => Box::pin(grpc.call(request)),
            Route::GrpcWeb => {
                let web = tonic_web::GrpcWebLayer::new().layer(grpc);
                match &self.cors {
                    Some(cors) => {
                        let mut service = cors.layer(web);
                        Box::pin(async move {
                            let response = service.call(request).await?;
                            Ok(response.map(Body::new))
                        })
                    }
                    None => {
                        let mut service = web;
                        Box::pin(async move { service.call(request).await })
                    }
                }
            }
            Route::Http => {
                let mut router = self.router.clone();
                Box::pin(async move {
                    let response: Result<_, Infallible> =
                        router.call(request.map(axum::body::Body::new)).await;
                    let Ok(response) = response;
                    Ok(response.map(Body::new))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(content_type: &str) -> http::Request<()> {
        http::Request::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    #[test]
    fn requests_are_routed_by_content_type() {
        assert_eq!(route(&with("application/grpc")), Route::Grpc);
        assert_eq!(route(&with("application/grpc+proto")), Route::Grpc);
        assert_eq!(route(&with("application/grpc-web+proto")), Route::GrpcWeb);
        assert_eq!(route(&with("application/grpc-web-text")), Route::GrpcWeb);
        assert_eq!(route(&with("application/json")), Route::Http);
        assert_eq!(route(&http::Request::new(())), Route::Http);
    }
}
