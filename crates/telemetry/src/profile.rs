//! On-demand CPU profiles in the pprof protobuf format (what `go tool pprof` and pprof-rs tooling read), shared
//! by the gateway's and the worker's `/debug/pprof/profile`.
//!
//! A [`Profiler`] admits one capture at a time ([`ProfileError::Busy`] for the rest) and checks the limits:
//! `seconds` in `1..=60` (default 10), `hz` in `1..=1000` (default 99). The sampler itself (a `SIGPROF` timer) is
//! process-wide, so a capture that finds one already running elsewhere in the process (another `Profiler`, as
//! in `ferry dev`) is `Busy` too.
//!
//! Nothing here blocks the async runtime: starting the sampler and symbolizing the report run in
//! `spawn_blocking`, and the capture itself is a tokio sleep. Dropping the future of [`Profiler::capture`] (the
//! client went away) stops the sampler.

use std::time::Duration;

/// The generated pprof protobuf types, for decoding a capture (`Profile::decode` through [`protos::Message`]).
pub use pprof::protos;

/// Capture length when the request names none.
pub const DEFAULT_SECONDS: u64 = 10;
/// Sampling frequency (Hz) when the request names none; not a round number, so sampling does not run in
/// lockstep with periodic work.
pub const DEFAULT_FREQUENCY: u32 = 99;
/// Longest capture accepted.
pub const MAX_SECONDS: u64 = 60;
/// Highest sampling frequency accepted (Hz).
pub const MAX_FREQUENCY: u32 = 1000;

/// Shared libraries whose frames are not sampled: unwinding through them from a signal handler is unsafe.
const BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// The `detail` of the 404 a role answers on `/debug/pprof/profile` while profiling is off.
pub const DISABLED_DETAIL: &str = "CPU profiling is off in this process; start it with --profiling \
    (or FERRY_PROFILING=true) to serve /debug/pprof/profile";

/// Why a capture was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Another capture is running in this process.
    #[error("a CPU profile is already being captured in this process; retry when it is done")]
    Busy,
    /// A parameter out of its limits or not a number: the parameter's name (`seconds`, `hz`) and the rule.
    #[error("{0}: {1}")]
    BadRequest(&'static str, String),
    /// The sampler could not start or the report could not be built.
    #[error("cannot capture a CPU profile: {0}")]
    Failed(String),
}

/// The limits a [`Profiler`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileLimits {
    pub max_seconds: u64,
    pub max_frequency: u32,
}

impl Default for ProfileLimits {
    fn default() -> Self {
        Self {
            max_seconds: MAX_SECONDS,
            max_frequency: MAX_FREQUENCY,
        }
    }
}

/// Captures CPU profiles, one at a time. Share it (in an `Arc`) between the requests of a listener.
#[derive(Debug, Default)]
pub struct Profiler {
    limits: ProfileLimits,
    running: tokio::sync::Mutex<()>,
}

impl Profiler {
    /// A profiler with the default limits (60 s, 1000 Hz).
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_limits(limits: ProfileLimits) -> Self {
        Self {
            limits,
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn limits(&self) -> ProfileLimits {
        self.limits
    }

    /// Whether a capture is running through this profiler.
    pub fn is_busy(&self) -> bool {
        self.running.try_lock().is_err()
    }

    /// `seconds` and `hz` as they came in a query string (absent: the defaults), parsed and checked against the
    /// limits. Errors name the parameter.
    pub fn params(
        &self,
        seconds: Option<&str>,
        hz: Option<&str>,
    ) -> Result<(u64, u32), ProfileError> {
        let seconds = match seconds {
            None => DEFAULT_SECONDS,
            Some(s) => s.trim().parse().map_err(|_| self.bad_seconds())?,
        };
        let hz = match hz {
            None => DEFAULT_FREQUENCY,
            Some(s) => s.trim().parse().map_err(|_| self.bad_frequency())?,
        };
        self.check(seconds, hz)?;
        Ok((seconds, hz))
    }

    fn bad_seconds(&self) -> ProfileError {
        ProfileError::BadRequest(
            "seconds",
            format!(
                "must be a whole number of seconds from 1 to {}",
                self.limits.max_seconds
            ),
        )
    }

    fn bad_frequency(&self) -> ProfileError {
        ProfileError::BadRequest(
            "hz",
            format!(
                "must be a whole number of samples per second from 1 to {}",
                self.limits.max_frequency
            ),
        )
    }

    fn check(&self, seconds: u64, frequency: u32) -> Result<(), ProfileError> {
        if !(1..=self.limits.max_seconds).contains(&seconds) {
            return Err(self.bad_seconds());
        }
        if !(1..=self.limits.max_frequency).contains(&frequency) {
            return Err(self.bad_frequency());
        }
        Ok(())
    }

    /// Sample every thread of the process at `frequency` Hz for `seconds`, and return the profile as an
    /// (uncompressed) pprof protobuf. [`ProfileError::Busy`] at once when a capture is already running.
    pub async fn capture(&self, seconds: u64, frequency: u32) -> Result<Vec<u8>, ProfileError> {
        self.check(seconds, frequency)?;
        let _running = self.running.try_lock().map_err(|_| ProfileError::Busy)?;
        // `frequency` is at most the limit, which a `u32` config could set past `i32::MAX`.
        let hz = i32::try_from(frequency).map_err(|_| self.bad_frequency())?;
        // Starting walks the loaded libraries and warms up the unwinder: blocking work.
        let guard = tokio::task::spawn_blocking(move || {
            pprof::ProfilerGuardBuilder::default()
                .frequency(hz)
                .blocklist(&BLOCKLIST)
                .build()
        })
        .await
        .map_err(|e| ProfileError::Failed(e.to_string()))?
        .map_err(|e| match e {
            // Another profiler of this process (the sampler is process-wide) is running.
            pprof::Error::Running => ProfileError::Busy,
            e => ProfileError::Failed(e.to_string()),
        })?;
        tracing::info!(seconds, hz = frequency, "capturing a CPU profile");
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        // Symbolizing every sampled stack is CPU-bound. The guard goes with it and stops the sampler when dropped.
        let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ProfileError> {
            let failed = |e: pprof::Error| ProfileError::Failed(e.to_string());
            let report = guard.report().build().map_err(failed)?;
            drop(guard);
            let profile = report.pprof().map_err(failed)?;
            Ok(protos::Message::encode_to_vec(&profile))
        })
        .await
        .map_err(|e| ProfileError::Failed(e.to_string()))??;
        tracing::info!(bytes = bytes.len(), "CPU profile captured");
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protos::Message;

    #[test]
    fn params_default_and_name_the_bad_one() {
        let p = Profiler::new();
        assert_eq!(
            p.params(None, None),
            Ok((DEFAULT_SECONDS, DEFAULT_FREQUENCY))
        );
        assert_eq!(p.params(Some("60"), Some("1000")), Ok((60, 1000)));
        assert_eq!(p.params(Some("1"), Some("1")), Ok((1, 1)));
        for (s, hz, field) in [
            (Some("0"), None, "seconds"),
            (Some("61"), None, "seconds"),
            (Some("-1"), None, "seconds"),
            (Some("abc"), None, "seconds"),
            (Some(""), None, "seconds"),
            (None, Some("0"), "hz"),
            (None, Some("1001"), "hz"),
            (None, Some("abc"), "hz"),
            (None, Some("9.5"), "hz"),
        ] {
            match p.params(s, hz) {
                Err(ProfileError::BadRequest(f, _)) => assert_eq!(f, field, "{s:?} {hz:?}"),
                other => panic!("{s:?} {hz:?}: {other:?}"),
            }
        }
        let small = Profiler::with_limits(ProfileLimits {
            max_seconds: 5,
            max_frequency: 10,
        });
        assert!(small.params(Some("6"), None).is_err());
        assert!(small.params(None, Some("11")).is_err());
    }

    /// One test for every capture: the sampler is process-wide, so captures in parallel tests would collide.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn captures_a_decodable_profile_one_at_a_time() {
        let p = std::sync::Arc::new(Profiler::new());
        assert!(matches!(
            p.capture(0, 99).await,
            Err(ProfileError::BadRequest("seconds", _))
        ));
        // A thread busy in plain code until the capture is done (a process that idles accrues no CPU time, so
        // nothing would be sampled; and the first capture of a process takes a while to start).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spin = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..100_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
                x
            }
        });
        let first = tokio::spawn({
            let p = p.clone();
            async move { p.capture(1, 200).await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !p.is_busy() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the first capture starts");
        assert_eq!(p.capture(1, 99).await, Err(ProfileError::Busy));
        let bytes = first.await.unwrap().expect("capture succeeds");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        let profile = protos::Profile::decode(bytes.as_slice()).expect("pprof protobuf");
        assert!(!profile.sample_type.is_empty());
        assert!(
            profile.duration_nanos >= 900_000_000,
            "{}",
            profile.duration_nanos
        );
        assert!(!profile.sample.is_empty(), "a busy thread was sampled");
        // The lock is released: the next capture runs.
        assert!(p.capture(1, 99).await.is_ok());
    }
}
