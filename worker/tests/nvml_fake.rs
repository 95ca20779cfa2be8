//! The NVML backend's real code path (nvml-wrapper, dlopen, the C ABI) against a fake
//! `libnvidia-ml` written in C (`tests/fake_nvml/fake_nvml.c`), compiled here with the system C
//! compiler (`$CC`, else `cc`). Each test loads its own copy of the library with its own
//! configuration file next to it, so the tests run in parallel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gangway_worker::devices::{
    DeviceBackend, DeviceError, DeviceKind, DeviceTelemetry, ErrorKind, HealthEvent, NvmlBackend,
};

/// The fake library, compiled once per test process.
fn fake_library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fake_nvml-{}.so", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
        let output = Command::new(&cc)
            .args([
                "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(
            output.status.success(),
            "{cc} failed to build {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        out
    })
}

/// A private copy of the fake library configured by `config`, loaded by path.
fn load(config: &str) -> (tempfile::TempDir, Result<NvmlBackend, DeviceError>) {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_library(), &lib).unwrap();
    std::fs::write(dir.path().join("libnvidia-ml.so.1.conf"), config).unwrap();
    let backend = NvmlBackend::load_from(&lib);
    (dir, backend)
}

fn domains(backend: &NvmlBackend) -> Vec<u16> {
    backend
        .inventory()
        .unwrap()
        .iter()
        .map(|d| d.nvlink_domain)
        .collect()
}

#[test]
fn backends_are_shareable_between_threads() {
    fn check<T: Send + Sync>() {}
    check::<NvmlBackend>();
    check::<Box<dyn DeviceBackend>>();
}

#[test]
fn four_gpus_with_nvlink_pairs_make_two_domains() {
    let (_dir, backend) = load("devices=4\nnvlink=0-1,2-3\nnuma=0,0,1,1\n");
    let backend = backend.unwrap();
    assert_eq!(backend.name(), "nvml");
    let inventory = backend.inventory().unwrap();
    assert_eq!(inventory.len(), 4);
    for (i, d) in inventory.iter().enumerate() {
        assert_eq!(d.index, i as u32);
        assert_eq!(d.uuid, format!("GPU-fa4e0000-0000-4000-8000-{i:012}"));
        assert_eq!(d.model, "H100");
        assert_eq!(d.raw_name, "NVIDIA H100 80GB HBM3");
        assert_eq!(d.kind, DeviceKind::Gpu);
        assert_eq!(d.memory_mib, 81_559);
        assert_eq!(d.pci_bus_id, format!("00000000:{:02X}:00.0", 0x10 + i));
        assert_eq!(d.numa_node, Some(i as u32 / 2));
    }
    assert_eq!(domains(&backend), [0, 0, 1, 1]);
}

#[test]
fn gpus_on_one_nvswitch_share_a_domain() {
    let (_dir, backend) = load(
        "devices=8\nname=NVIDIA A100-SXM4-80GB\nmemory_mib=81920\n\
         nvlink=0-s0,1-s0,2-s0,3-s0,4-s1,5-s1,6-s1,7-s1,0-s2,4-s3\n",
    );
    let backend = backend.unwrap();
    assert_eq!(domains(&backend), [0, 0, 0, 0, 1, 1, 1, 1]);
    let inventory = backend.inventory().unwrap();
    assert_eq!(inventory[0].model, "A100-80G");
    assert_eq!(
        inventory[0].numa_node, None,
        "NUMA NotSupported is tolerated"
    );
}

#[test]
fn gpus_without_nvlink_are_alone() {
    let (_dir, backend) = load("devices=3\nnvlink=1-2\n");
    assert_eq!(domains(&backend.unwrap()), [0, 1, 1]);
    let (_dir, backend) = load("devices=3\n");
    assert_eq!(domains(&backend.unwrap()), [0, 1, 2]);
    let (_dir, backend) = load("devices=0\n");
    let backend = backend.unwrap();
    assert!(backend.inventory().unwrap().is_empty());
    assert!(backend.telemetry().unwrap().is_empty());
}

#[test]
fn telemetry_reads_back_utilization_and_memory() {
    let (_dir, backend) = load("devices=4\nutil=10,20,30,100\nmem_used_mib=100,2000,0,81559\n");
    let backend = backend.unwrap();
    let telemetry = backend.telemetry().unwrap();
    let read: Vec<_> = telemetry
        .iter()
        .map(|t| (t.index, t.utilization_pct, t.memory_used_mib))
        .collect();
    assert_eq!(
        read,
        [(0, 10, 100), (1, 20, 2000), (2, 30, 0), (3, 100, 81_559)]
    );
    assert!(telemetry.iter().all(|t| t.healthy && t.events.is_empty()));
}

#[test]
fn uncorrected_ecc_errors_make_a_device_unhealthy() {
    let (_dir, backend) = load("devices=4\necc=0,0,5,0\n");
    let backend = backend.unwrap();
    let telemetry = backend.telemetry().unwrap();
    let healthy: Vec<_> = telemetry.iter().map(|t| t.healthy).collect();
    assert_eq!(healthy, [true, true, false, true]);
    assert_eq!(
        telemetry[2].events,
        [HealthEvent::EccUncorrected { count: 5 }]
    );
    // The event is reported once; the device stays unhealthy.
    let telemetry = backend.telemetry().unwrap();
    assert!(!telemetry[2].healthy);
    assert!(telemetry[2].events.is_empty());
}

#[test]
fn ecc_not_supported_is_tolerated() {
    let (_dir, backend) = load("devices=2\necc=3,3\nfail=nvmlDeviceGetTotalEccErrors:3\n");
    let telemetry = backend.unwrap().telemetry().unwrap();
    assert!(telemetry.iter().all(|t| t.healthy && t.events.is_empty()));
}

/// XIDs arrive through the event thread: poll telemetry until every device's events are in.
fn collect_events(backend: &NvmlBackend, want: usize) -> Vec<DeviceTelemetry> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<DeviceTelemetry> = backend.telemetry().unwrap();
    while seen.iter().map(|t| t.events.len()).sum::<usize>() < want {
        assert!(
            Instant::now() < deadline,
            "XID events did not arrive: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        for (all, now) in seen.iter_mut().zip(backend.telemetry().unwrap()) {
            all.events.extend(now.events);
            all.healthy = now.healthy;
        }
    }
    seen
}

#[test]
fn xid_events_are_reported_and_fatal_ones_make_a_device_unhealthy() {
    let (_dir, backend) = load("devices=3\nxid=1:79,2:13\n");
    let backend = backend.unwrap();
    let telemetry = collect_events(&backend, 2);
    assert!(telemetry[0].healthy && telemetry[0].events.is_empty());
    assert!(!telemetry[1].healthy, "XID 79: fallen off the bus");
    assert_eq!(telemetry[1].events, [HealthEvent::Xid { code: Some(79) }]);
    assert!(telemetry[2].healthy, "XID 13 is an application fault");
    assert_eq!(telemetry[2].events, [HealthEvent::Xid { code: Some(13) }]);
}

#[test]
fn xid_events_not_supported_leave_telemetry_working() {
    let (_dir, backend) = load("devices=2\nxid=0:79\nfail=nvmlDeviceGetSupportedEventTypes:3\n");
    let backend = backend.unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let telemetry = backend.telemetry().unwrap();
    assert!(telemetry.iter().all(|t| t.healthy && t.events.is_empty()));
}

#[test]
fn a_lost_gpu_is_unhealthy_without_failing_the_host() {
    // 15: NVML_ERROR_GPU_IS_LOST.
    let (_dir, backend) = load("devices=2\nutil=50,50\nfail=nvmlDeviceGetUtilizationRates@1:15\n");
    let backend = backend.unwrap();
    let telemetry = backend.telemetry().unwrap();
    assert!(telemetry[0].healthy);
    assert_eq!(telemetry[0].utilization_pct, 50);
    assert!(!telemetry[1].healthy);
    assert_eq!(telemetry[1].events, [HealthEvent::Lost]);
    let telemetry = backend.telemetry().unwrap();
    assert!(!telemetry[1].healthy && telemetry[1].events.is_empty());
}

#[test]
fn a_missing_library_says_what_to_do() {
    let err = NvmlBackend::load_from("/nonexistent/libnvidia-ml.so.1").unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, DeviceError::LibraryNotFound { .. }),
        "{err:?}"
    );
    assert!(
        message.starts_with(
            "NVIDIA management library (libnvidia-ml.so.1) not found at \
             /nonexistent/libnvidia-ml.so.1: install the NVIDIA driver, or run with --fake-devices"
        ),
        "{message}"
    );
    assert!(!err.is_retryable());

    // This machine has no driver, or the default load works: either way no panic.
    match NvmlBackend::load() {
        Ok(_) => {}
        Err(err @ DeviceError::LibraryNotFound { .. }) => assert!(
            err.to_string().starts_with(
                "NVIDIA management library (libnvidia-ml.so.1) not found: install the NVIDIA \
                 driver, or run with --fake-devices"
            ),
            "{err}"
        ),
        Err(err) => println!("default NVML present but failing: {err}"),
    }
}

#[test]
fn a_failing_init_names_the_call() {
    // 9: NVML_ERROR_DRIVER_NOT_LOADED.
    let (_dir, backend) = load("devices=2\nfail=nvmlInit_v2:9\n");
    let err = backend.unwrap_err();
    match &err {
        DeviceError::Call {
            call, device, kind, ..
        } => {
            assert_eq!(*call, "nvmlInit_v2");
            assert_eq!(*device, None);
            assert_eq!(*kind, ErrorKind::Fatal);
        }
        other => panic!("expected a failed call, got {other:?}"),
    }
    assert!(err.to_string().starts_with("nvmlInit_v2 failed: "), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn a_library_that_is_not_nvml_names_the_missing_call() {
    let err = NvmlBackend::load_from("libm.so.6").unwrap_err();
    assert!(err.to_string().starts_with("nvmlInit_v2 failed: "), "{err}");
}

#[test]
fn failing_device_calls_name_the_call_and_device() {
    // 999: NVML_ERROR_UNKNOWN.
    let (_dir, backend) = load("devices=3\nfail=nvmlDeviceGetUUID@2:999\n");
    let err = backend.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("nvmlDeviceGetUUID failed on device 2: "),
        "{err}"
    );
    assert_eq!(err.device(), Some(2));
    assert!(!err.is_retryable());

    // 10: NVML_ERROR_TIMEOUT, worth retrying at the next heartbeat.
    let (_dir, backend) = load("devices=2\nfail=nvmlDeviceGetMemoryInfo_v2@1:10\n");
    let err = backend.unwrap_err();
    assert!(err
        .to_string()
        .starts_with("nvmlDeviceGetMemoryInfo_v2 failed on device 1"));
    assert!(err.is_retryable());
}

/// Copies of the library configured at the same moment on several threads, as the tests of this
/// file are: each must read its own NVLinks. (The fake once split its lists with `strtok`, whose
/// position is one static of the C library shared by every copy, and two tests here read each
/// other's links.)
#[test]
fn copies_configured_at_once_each_read_their_own_links() {
    // Thread t links its 64 devices in pairs t apart (pairs 0-t, 1-(t+1), ... in blocks of 2t),
    // a long list so that the parsing of one overlaps the others'.
    fn config(t: usize) -> (String, Vec<u16>) {
        let mut links = Vec::new();
        let mut expected = vec![0u16; 64];
        let mut domain = 0u16;
        for block in (0..64).step_by(2 * t) {
            for a in block..block + t {
                links.push(format!("{a}-{}", a + t));
                expected[a] = domain;
                expected[a + t] = domain;
                domain += 1;
            }
        }
        (
            format!("devices=64\nnvlink={}\n", links.join(",")),
            expected,
        )
    }
    let threads: Vec<_> = [1, 2, 4, 8, 16, 32]
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                let (conf, expected) = config(t);
                for round in 0..50 {
                    let (_dir, backend) = load(&conf);
                    let got = domains(&backend.unwrap());
                    assert_eq!(got, expected, "pairs {t} apart, round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a copy read another's configuration");
    }
}
