use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A policy without the window, so single decisions show the other rules alone.
fn p() -> Policy {
    Policy {
        min_workers: 0,
        max_workers: 100,
        scale_down_stabilization_seconds: 0.0,
        ..Policy::default()
    }
}

fn waiting(n: u64) -> Signals {
    Signals {
        waiting: n,
        ..Signals::default()
    }
}

fn once(policy: &Policy, s: Signals, current: u32) -> Decision {
    decide(policy, &s, current, secs(1000), &mut History::default())
}

#[test]
fn the_hpa_examples() {
    // Kubernetes HPA documentation: desired = ceil(current × metric / target). With a target of 100 waiting jobs
    // per worker, one worker facing 200 is a metric twice the target: the replicas double.
    let d = once(&p(), waiting(200), 1);
    assert_eq!((d.desired, d.reason), (2, Reason::Need));
    // Half the target: the replicas halve.
    let d = once(&p(), waiting(100), 2);
    assert_eq!((d.desired, d.reason), (1, Reason::Need));
    // Within the default 10 % tolerance nothing changes, in either direction.
    for (backlog, current) in [(2_100, 20), (1_900, 20), (2_000, 20)] {
        let d = once(&p(), waiting(backlog), current);
        assert_eq!(d.desired, 20, "{backlog} waiting on {current}: {d:?}");
    }
    assert_eq!(once(&p(), waiting(2_100), 20).reason, Reason::Tolerance);
    // Outside it, the need is taken.
    assert_eq!(once(&p(), waiting(2_300), 20).desired, 23);
    assert_eq!(once(&p(), waiting(1_700), 20).desired, 17);
}

#[test]
fn the_hpa_default_scale_up_limit_is_4_workers_or_100_percent() {
    // From 1: at most max(1 + 4, 2) = 5.
    let d = once(&p(), waiting(10_000), 1);
    assert_eq!((d.desired, d.need, d.reason), (5, 100, Reason::Step));
    // From 10: at most max(14, 20) = 20.
    assert_eq!(once(&p(), waiting(10_000), 10).desired, 20);
    // From 0: at most 4 at once.
    assert_eq!(once(&p(), waiting(10_000), 0).desired, 4);
}

#[test]
fn the_measured_rate_sizes_for_the_target_drain_time() {
    // 10 jobs/s per worker, drain 12,000 within 60 s: 12,000 / 600 = 20 workers.
    let s = Signals {
        waiting: 12_000,
        rate_per_worker: Some(10.0),
        ..Signals::default()
    };
    let d = once(&p(), s, 20);
    assert_eq!((d.desired, d.need), (20, 20));
    assert_eq!(d.drain_seconds, Some(60.0));
    // A scheduled burst coming due counts the same.
    let s = Signals {
        waiting: 6_000,
        due_soon: 6_000,
        rate_per_worker: Some(10.0),
        ..Signals::default()
    };
    assert_eq!(need(&p(), &s), 20);
    // Running jobs keep at least one worker; nothing at all lets the queue go to zero.
    let running = Signals {
        active: 5,
        rate_per_worker: Some(10.0),
        ..Signals::default()
    };
    assert_eq!(need(&p(), &running), 1);
    assert_eq!(once(&p(), Signals::default(), 3).desired, 0);
}

#[test]
fn before_any_rate_the_backlog_per_worker_target_applies() {
    let s = Signals {
        waiting: 150,
        active: 100,
        ..Signals::default()
    };
    // (150 + 100) / 100 → 3.
    assert_eq!(need(&p(), &s), 3);
    // A rate of zero or not a number is no rate.
    for bad in [0.0, f64::NAN, f64::INFINITY] {
        let s = Signals {
            rate_per_worker: Some(bad),
            ..s
        };
        assert_eq!(need(&p(), &s), 3, "{bad}");
    }
}

#[test]
fn the_first_waiting_job_wakes_a_queue_from_zero() {
    let d = once(&p(), waiting(1), 0);
    assert_eq!((d.desired, d.reason), (1, Reason::Wake));
    // Also when a measured rate says one worker would be idle most of the time.
    let s = Signals {
        due_soon: 1,
        rate_per_worker: Some(1_000.0),
        ..Signals::default()
    };
    assert_eq!(once(&p(), s, 0).desired, 1);
    // Nothing waiting: zero stays zero.
    assert_eq!(once(&p(), Signals::default(), 0).desired, 0);
}

#[test]
fn bounds_hold() {
    let bounded = Policy {
        min_workers: 2,
        max_workers: 20,
        ..p()
    };
    let d = once(&bounded, Signals::default(), 2);
    assert_eq!((d.desired, d.reason), (2, Reason::Bound));
    let d = once(&bounded, waiting(5_000), 15);
    assert_eq!((d.desired, d.reason), (20, Reason::Bound));
}

#[test]
fn scale_down_waits_for_the_stabilization_window() {
    let policy = Policy {
        min_workers: 1,
        max_workers: 100,
        ..Policy::default()
    };
    assert_eq!(policy.scale_down_stabilization_seconds, 300.0);
    let mut h = History::default();
    // A burst: 10 recommended at t = 0.
    let d = decide(&policy, &waiting(1_000), 10, secs(0), &mut h);
    assert_eq!(d.desired, 10);
    // The burst is gone at t = 100: the window still holds 10.
    let d = decide(&policy, &waiting(0), 10, secs(100), &mut h);
    assert_eq!((d.desired, d.need, d.reason), (10, 0, Reason::Stabilized));
    // A partial dip at t = 200 goes no lower than the window's highest either.
    let d = decide(&policy, &waiting(300), 10, secs(200), &mut h);
    assert_eq!(d.desired, 10);
    // At t = 301 the burst's recommendation has left the window; t = 200's 3 is the highest left.
    let d = decide(&policy, &waiting(0), 10, secs(301), &mut h);
    assert_eq!((d.desired, d.reason), (3, Reason::Stabilized));
    // And once that one has left too, the minimum.
    let d = decide(&policy, &waiting(0), 3, secs(502), &mut h);
    assert_eq!(d.desired, 1);
    // Scaling up never waits.
    let d = decide(&policy, &waiting(400), 1, secs(503), &mut h);
    assert_eq!(d.desired, 4);
}

#[test]
fn validation_names_the_key() {
    let bad = [
        (
            Policy {
                max_workers: 0,
                ..Policy::default()
            },
            "max-workers",
        ),
        (
            Policy {
                min_workers: 5,
                max_workers: 2,
                ..Policy::default()
            },
            "min-workers",
        ),
        (
            Policy {
                target_drain_seconds: 0.0,
                ..Policy::default()
            },
            "target-drain-seconds",
        ),
        (
            Policy {
                tolerance: 1.5,
                ..Policy::default()
            },
            "tolerance",
        ),
        (
            Policy {
                backlog_per_worker: 0,
                ..Policy::default()
            },
            "backlog-per-worker",
        ),
    ];
    for (policy, key) in bad {
        let e = policy.validate().unwrap_err();
        assert!(e.starts_with(key), "{e}");
    }
    Policy::default().validate().unwrap();
}
