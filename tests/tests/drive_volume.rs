//! A whole node serving a volume on a simulated NVMe drive: `duplex-drive-sim` (a process, two
//! vfio-user ports), duplexd with the datapath driving port A through its user-space NVMe
//! driver, and the NVMe/TCP host (`duplex-bench --verify`) on the fabric. Then another
//! controller takes the drive's reservation through port B: the node's writes fail with
//! Reservation Conflict all the way to the host (fenced), its reads go on; after the release,
//! writes work again. The drive's control CLI shows the registrants.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use duplex_datapath::nvme::vfio_user::VfioUser;
use duplex_datapath::nvme::{Controller, DmaMem, Options};
use duplex_nvme::resv::{
    Acquire, AcquireAction, Cptpl, Register, RegisterAction, Release, ReleaseAction, ResvType,
};
use duplex_tests::{bin, duplex_bench, free_port, storage_config, KillOnDrop, Node};

const SUBNQN: &str = "nqn.2026-11.io.duplex:drive";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:d0b1e5c4-0000-4000-8000-000000000006";

fn ctl(control: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("duplex-drive-sim"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("duplex-drive-sim ctl runs");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

#[test]
fn a_node_serves_a_volume_on_a_simulated_drive_and_is_fenced_by_its_reservation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, control) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("ctl.sock"),
    );
    let mut sim = Command::new(bin("duplex-drive-sim"))
        .arg("serve")
        .arg("--backing")
        .arg(dir.path().join("d0.img"))
        .args(["--size", "64M", "--block-size", "4096"])
        .arg("--socket")
        .arg(&a)
        .arg("--socket")
        .arg(&b)
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::piped())
        .spawn()
        .expect("duplex-drive-sim starts");
    let mut ready = String::new();
    BufReader::new(sim.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    let _sim = KillOnDrop(sim);
    assert!(ready.starts_with("ready "), "{ready}");

    let port = free_port();
    let mut node = Node::start(&storage_config(
        "drive-node",
        port,
        &format!(
            "drive = \"vfio-user:{a}\"\nsize = \"64MiB\"",
            a = a.display()
        ),
        SUBNQN,
        HOSTNQN,
    ));
    node.log.wait_for(&["drive volume ready"]);
    node.log.wait_for(&["fabric ready"]);

    // The host's verified I/O goes through the fabric, the datapath's driver and the drive.
    for extra in [&["--bs", "4k"][..], &["--bs", "128k"][..]] {
        let mut args = vec![
            "--workload",
            "mixed",
            "--verify",
            "--ios",
            "3000",
            "--qd",
            "16",
            "--queues",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = duplex_bench(port, SUBNQN, HOSTNQN, &args);
        assert_eq!(code, 0, "duplex-bench {args:?}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
        assert_eq!(v["verify"]["errors"], 0, "{out}");
    }
    let span = ["--span-blocks", "64", "--seed", "5", "--qd", "4"];
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[
            &["--workload", "write", "--verify", "--ios", "64"][..],
            &span,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");

    // Another controller (the peer node, say) takes the drive through port B.
    let t = VfioUser::connect(&b, Duration::from_secs(5)).expect("port B");
    let opts = Options {
        host_id: Some([0xB; 16]),
        ..Options::default()
    };
    let mem = DmaMem::create("peer", opts.dma_len(), 0).expect("DMA memory");
    let mut peer = Controller::new(t, mem, opts).expect("port B controller");
    let key = 0xFE4CE;
    peer.resv_register(
        1,
        1,
        &Register {
            action: RegisterAction::Register,
            iekey: false,
            cptpl: Cptpl::NoChange,
            crkey: 0,
            nrkey: key,
        },
    )
    .expect("controller")
    .expect("register");
    peer.resv_acquire(
        1,
        1,
        &Acquire {
            action: AcquireAction::Acquire,
            rtype: ResvType::WriteExclusive,
            crkey: key,
            prkey: 0,
        },
    )
    .expect("controller")
    .expect("acquire");
    let status = ctl(&control, &["status"]);
    assert_eq!(
        status["reservation"]["registrants"][0]["key"], key,
        "{status}"
    );

    // Fenced: the node's writes fail with Reservation Conflict at the host; reads go on.
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &["--workload", "write", "--ios", "8", "--qd", "1"],
    );
    assert_ne!(code, 0, "a write went through a reservation: {out}{err}");
    assert!(
        format!("{out}{err}").contains("reservation conflict"),
        "the host sees why: {out}{err}"
    );
    node.log.wait_for(&["reservation conflict"]);
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[&["--verify-only"][..], &span].concat(),
    );
    assert_eq!(
        code, 0,
        "reads are allowed under Write Exclusive: {out}{err}"
    );

    // Released: writes work again.
    peer.resv_release(
        1,
        1,
        &Release {
            action: ReleaseAction::Clear,
            rtype: 0,
            crkey: key,
        },
    )
    .expect("controller")
    .expect("clear");
    let (code, out, err) = duplex_bench(
        port,
        SUBNQN,
        HOSTNQN,
        &[
            "--workload",
            "write",
            "--verify",
            "--ios",
            "64",
            "--qd",
            "4",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let status = ctl(&control, &["status"]);
    assert_eq!(status["reservation"]["registrants"], serde_json::json!([]));
    node.stop();
}
