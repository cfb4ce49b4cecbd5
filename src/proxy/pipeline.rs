//! The assembled call pipeline as one type, shared rather than copied.
//!
//! Every stage is a tower service that owns the stages below it, and a call clones the stage
//! it runs through (its future outlives `&mut self`). Boxed with tower's `BoxCloneSyncService`,
//! that clone was a new heap box per boxed level, and each level boxed its stage's (already
//! boxed) future once more: 25 allocations per call for the ten stages of a full config
//! (heaptrack). Here each level is an `Arc`: cloning the pipeline, or a stage holding it, only
//! counts references, and a stage's [`CallFuture`] is returned as it is.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tower::Service;

use super::{CallFuture, GrpcRequest, GrpcResponse};
use crate::error::ProxyError;

/// The call pipeline (or any part of it): a stage with everything below it. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline(Arc<dyn Stage>);

impl Pipeline {
    pub fn new<S>(stage: S) -> Pipeline
    where
        S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        Pipeline(Arc::new(stage))
    }
}

/// A stage called through a shared reference: each call runs on its own clone of the stage
/// (a few reference counts: stages hold `Arc`s and the `Pipeline` below them).
trait Stage: Send + Sync {
    fn call(&self, request: GrpcRequest) -> CallFuture;
}

impl<S> Stage for S
where
    S: Service<GrpcRequest, Response = GrpcResponse, Error = ProxyError, Future = CallFuture>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn call(&self, request: GrpcRequest) -> CallFuture {
        let mut stage = self.clone();
        // No stage applies backpressure (each passes its inner stage's readiness down to the
        // forwarder, which is always ready), so readiness is asked once, without waiting: a
        // stage that ever answered "not yet" would have its call refused, not sent unready.
        match stage.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Service::call(&mut stage, request),
            Poll::Ready(Err(error)) => Box::pin(std::future::ready(Err(error))),
            Poll::Pending => Box::pin(std::future::ready(Err(ProxyError::Overloaded(
                "a pipeline stage is not ready".into(),
            )))),
        }
    }
}

impl Service<GrpcRequest> for Pipeline {
    type Response = GrpcResponse;
    type Error = ProxyError;
    type Future = CallFuture;

    /// Always ready: each call asks its stage when it is made (see [`Stage`]).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: GrpcRequest) -> CallFuture {
        self.0.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::proxy::CallRequest;
    use crate::schema::Schema;
    use tower::ServiceExt;

    fn request() -> GrpcRequest {
        Box::new(CallRequest {
            method: Schema::global()
                .method("/temporal.api.workflowservice.v1.WorkflowService/GetSystemInfo")
                .expect("a known method"),
            headers: http::HeaderMap::new(),
            message: bytes::Bytes::new(),
            deadline: None,
            namespace: None,
            targets: Vec::new(),
            peer: Arc::default(),
        })
    }

    /// Answers every call; counts the calls made on any of its clones.
    #[derive(Clone)]
    struct Answer(Arc<AtomicUsize>);

    impl Service<GrpcRequest> for Answer {
        type Response = GrpcResponse;
        type Error = ProxyError;
        type Future = CallFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: GrpcRequest) -> CallFuture {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(GrpcResponse::default()) })
        }
    }

    /// Never ready (or failing readiness): a stage with backpressure.
    #[derive(Clone)]
    struct NotReady {
        fail: bool,
        calls: Arc<AtomicUsize>,
    }

    impl Service<GrpcRequest> for NotReady {
        type Response = GrpcResponse;
        type Error = ProxyError;
        type Future = CallFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            match self.fail {
                true => Poll::Ready(Err(ProxyError::ShuttingDown)),
                false => Poll::Pending,
            }
        }
        fn call(&mut self, _: GrpcRequest) -> CallFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(GrpcResponse::default()) })
        }
    }

    #[tokio::test]
    async fn clones_share_the_stage_and_every_call_reaches_it() {
        let calls = Arc::new(AtomicUsize::new(0));
        let pipeline = Pipeline::new(Answer(calls.clone()));
        for _ in 0..3 {
            let answer = pipeline.clone().oneshot(request()).await;
            assert!(answer.is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stage_that_is_not_ready_is_refused_not_called() {
        for (fail, code) in [
            (false, tonic::Code::ResourceExhausted),
            (true, tonic::Code::Unavailable),
        ] {
            let calls = Arc::new(AtomicUsize::new(0));
            let pipeline = Pipeline::new(NotReady {
                fail,
                calls: calls.clone(),
            });
            let error = match pipeline.oneshot(request()).await {
                Err(error) => error,
                Ok(_) => panic!("a stage that is not ready answered"),
            };
            assert_eq!(error.code(), code);
            assert_eq!(calls.load(Ordering::SeqCst), 0);
        }
    }
}
