//! A client-side limit on Kubernetes API requests: a token bucket of `burst` tokens refilled at
//! `qps` per second, as client-go's (Argo Rollouts: 40 QPS, burst 80). A request waits for a
//! token; a watch takes one token when it starts, however long it streams.
//!
//! It is a `tower` layer on the controller's client. Leader election uses a client without it,
//! so a queue of status writes can never delay a Lease renewal past the lease's duration.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Tokens and when they were last counted.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The shared bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    bucket: Arc<Mutex<Bucket>>,
}

impl TokenBucket {
    /// `qps` tokens a second, at most `burst` saved up (it starts full).
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            qps: qps.max(0.001),
            burst,
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            })),
        }
    }

    /// Whether at least half the burst is saved up: no request is queued and a burst of
    /// urgent ones would still pass at once. Deferrable work (analysis checkpoints) is done
    /// only then, so it never makes a decision wait for a token.
    pub fn has_room(&self) -> bool {
        let bucket = self.refilled();
        bucket.tokens >= self.burst / 2.0 + 1.0
    }

    /// Claim room for one deferrable request (a checkpoint, an Event): `None` unless
    /// [`TokenBucket::has_room`]. The claim holds a token until it is dropped (after the
    /// request, which takes its own token): without it, 1,000 Canaries judged at one tick would
    /// all see room at the same instant, and their 1,000 writes would queue ahead of the
    /// decisions' writes for 20 s. With it, at most half the burst of deferrable requests is
    /// ever in flight, and urgent requests never wait behind them.
    pub fn claim_room(&self) -> Option<RoomClaim> {
        let mut bucket = self.refilled();
        if bucket.tokens < self.burst / 2.0 + 1.0 {
            return None;
        }
        bucket.tokens -= 1.0;
        Some(RoomClaim {
            bucket: self.clone(),
        })
    }

    /// The bucket, with the tokens earned since it was last counted.
    fn refilled(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = match self.bucket.lock() {
            Ok(bucket) => bucket,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.qps;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        bucket
    }

    /// Take a token now, or say how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut bucket = self.refilled();
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.qps))
        }
    }
}

/// Room claimed for one deferrable request; its token goes back when dropped.
#[derive(Debug)]
pub struct RoomClaim {
    bucket: TokenBucket,
}

impl Drop for RoomClaim {
    fn drop(&mut self) {
        let mut bucket = self.bucket.refilled();
        bucket.tokens = (bucket.tokens + 1.0).min(self.bucket.burst);
    }
}

/// The layer: every request through the wrapped service takes a token first.
#[derive(Debug, Clone)]
pub struct ThrottleLayer {
    bucket: TokenBucket,
}

impl ThrottleLayer {
    pub fn new(qps: f64, burst: u32) -> Self {
        ThrottleLayer {
            bucket: TokenBucket::new(qps, burst),
        }
    }

    /// The bucket every request through this layer takes its token from.
    pub fn bucket(&self) -> TokenBucket {
        self.bucket.clone()
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttled<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Throttled {
            inner,
            bucket: self.bucket.clone(),
            wait: None,
            holds_token: false,
        }
    }
}

/// A service whose calls wait for a token (in `poll_ready`, as `tower` intends).
pub struct Throttled<S> {
    inner: S,
    bucket: TokenBucket,
    wait: Option<Pin<Box<Sleep>>>,
    holds_token: bool,
}

impl<S, R> Service<R> for Throttled<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.holds_token {
            if let Some(wait) = self.wait.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            match self.bucket.try_take() {
                Ok(()) => self.holds_token = true,
                Err(wait) => self.wait = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.holds_token = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_at_once_then_requests_follow_the_rate() {
        let started = Instant::now();
        let service =
            tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(Instant::now()) });
        let mut throttled = ThrottleLayer::new(10.0, 5).layer(service);
        let mut times = Vec::new();
        for _ in 0..25 {
            times.push(throttled.ready().await.unwrap().call(()).await.unwrap());
        }
        let offsets: Vec<f64> = times
            .iter()
            .map(|t| t.duration_since(started).as_secs_f64())
            .collect();
        assert!(
            offsets[..5].iter().all(|t| *t < 0.001),
            "the burst: {offsets:?}"
        );
        // 20 more at 10 per second: the last one about 2 s in.
        let last = offsets[24];
        assert!((1.95..2.1).contains(&last), "{offsets:?}");
        // After a quiet second, 10 tokens have come back (capped at the burst of 5).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = Instant::now();
        for _ in 0..5 {
            throttled.ready().await.unwrap().call(()).await.unwrap();
        }
        assert!(before.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn room_means_half_the_burst_is_saved_up() {
        let bucket = TokenBucket::new(10.0, 10);
        assert!(bucket.has_room(), "a full bucket");
        for _ in 0..5 {
            bucket.try_take().unwrap();
        }
        assert!(!bucket.has_room(), "5 of 10 left: urgent requests only");
        // 0.1 s later one more token: 6 ≥ 10/2 + 1.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(bucket.has_room());
    }

    #[tokio::test(start_paused = true)]
    async fn claims_stop_a_stampede_of_deferrable_requests() {
        // (tokens saved up, claims asked for at one instant) → (claims granted, tokens after
        // every claimed request took its own token and its claim was dropped)
        let cases = [
            (100, 1000, 50, 50.0),
            (100, 10, 10, 90.0),
            (51, 1000, 1, 50.0),
            (50, 1000, 0, 50.0),
            (60, 1000, 10, 50.0),
        ];
        for (saved, asked, granted, left) in cases {
            let bucket = TokenBucket::new(50.0, 100);
            for _ in saved..100 {
                bucket.try_take().unwrap();
            }
            let claims: Vec<RoomClaim> = (0..asked).filter_map(|_| bucket.claim_room()).collect();
            assert_eq!(claims.len(), granted, "{saved} saved, {asked} asked");
            // Urgent requests still find at least half the burst.
            assert!(bucket.refilled().tokens >= 50.0, "{saved} saved");
            for claim in claims {
                bucket.try_take().unwrap();
                drop(claim);
            }
            assert_eq!(
                bucket.refilled().tokens,
                left,
                "{saved} saved, {asked} asked"
            );
        }
    }
}
