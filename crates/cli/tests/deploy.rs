//! The deployment files in `deploy/`, checked by a validator of each kind (hadolint,
//! `systemd-analyze verify`, kubernetes-validate) and by what they run: each file's `lsplit
//! serve` command and its health check (`lsplit health`), with the paths and ports a container
//! or a host would have mapped to a temporary PKI, the default model and free loopback ports.

mod common;
mod served;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::python;
use lsplit_testkit::process::announced;
use serde_json::Value;
use served::{Pki, file, model, run};

/// A file of `deploy/`.
fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// The text of a file of `deploy/`.
fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).expect("a deploy/ file")
}

/// The URL a health check in `deploy/` dials: the server in the same container or host.
const LOCAL_SERVER: &str = "https://localhost:50051";

/// `arg` of a deployment file's command, with what the file expects at fixed places mapped
/// into this test: the binary, the model, the TLS files and token (`/etc/lsplit/NAME`, or a
/// systemd credential `%d/NAME`) and the listening addresses (a free loopback port each).
fn local(arg: &str, pki: &Path) -> String {
    let name = arg
        .strip_prefix("/etc/lsplit/")
        .or_else(|| arg.strip_prefix("%d/"));
    match (arg, name) {
        (_, Some(name)) => file(pki, name).display().to_string(),
        ("lsplit" | "/usr/local/bin/lsplit", _) => env!("CARGO_BIN_EXE_lsplit").to_string(),
        ("/models/model.gguf" | "/var/lib/lsplit/models/model.gguf", _) => {
            model().display().to_string()
        }
        ("0.0.0.0:50051" | "0.0.0.0:9100" | "127.0.0.1:9100", _) => "127.0.0.1:0".to_string(),
        _ => arg.to_string(),
    }
}

/// `argv` (a program and its arguments) mapped by [`local`], with the health check's server
/// at `port`.
fn command(argv: &[String], pki: &Path, port: u16) -> Command {
    let mapped: Vec<String> = argv
        .iter()
        .map(|arg| match arg.as_str() {
            LOCAL_SERVER => format!("https://localhost:{port}"),
            _ => local(arg, pki),
        })
        .collect();
    let mut command = Command::new(&mapped[0]);
    command.args(&mapped[1..]).env("LSPLIT_LOG", "warn");
    command
}

/// Runs `serve` (a file's `lsplit serve` command line) and `health` (its health check) as the
/// file would: the check passes with `SERVING`, and once the server is told to stop it fails
/// with NOT_SERVING while the server drains.
fn serves_and_reports_health(serve: &[String], health: &[String]) {
    assert_eq!(&serve[1], "serve", "{serve:?}");
    assert_eq!(&health[1..3], ["health", LOCAL_SERVER], "{health:?}");
    let pki = Pki::new();
    let mut server = command(serve, &pki.dir(), 0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the file's lsplit serve");
    let announced = announced(&mut server, false);
    let (banner, port) = (announced.banner, announced.port);
    assert!(
        banner.starts_with("lsplit serve: trunk layers 2..28 of 30"),
        "{banner}"
    );

    let out = run(&mut command(health, &pki.dir(), port));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SERVING\n");

    run(Command::new("kill").args(["-TERM", &server.id().to_string()]));
    let out: Output = (0..500)
        .map(|_| {
            command(health, &pki.dir(), port)
                .output()
                .expect("lsplit health")
        })
        .find(|out| !out.status.success())
        .expect("health kept passing after SIGTERM");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "NOT_SERVING\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "https://localhost:{port} reports NOT_SERVING for \"lsplit.trunk.v1.Trunk\""
        )),
        "{stderr}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// A validator installed by scripts/test.sh beside the test venv's Python.
fn venv_tool(name: &str) -> PathBuf {
    let tool = python().with_file_name(name);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/test.sh, which installs crates/cli/tests/deploy/requirements.txt",
        tool.display()
    );
    tool
}

/// Fails with the tool's report unless `command` succeeds and reports nothing.
fn silent_success(command: &mut Command) {
    let out = command.output().expect("run the validator");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "{command:?}: {}\n{report}",
        out.status
    );
}

/// A JSON array of strings (an exec-form instruction of a Dockerfile).
fn strings(json: &str) -> Vec<String> {
    serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("not a JSON list ({e}): {json}"))
}

#[test]
fn the_dockerfile_lints_clean_and_its_entrypoint_serves_with_a_working_healthcheck() {
    silent_success(Command::new(venv_tool("hadolint")).arg(deploy("Dockerfile")));
    // Instructions, with continuation lines joined.
    let text = read("Dockerfile").replace("\\\n", " ");
    let instruction = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in deploy/Dockerfile"))
    };
    let mut serve = strings(instruction("ENTRYPOINT"));
    serve.extend(strings(instruction("CMD")));
    let healthcheck = instruction("HEALTHCHECK");
    let (_, health) = healthcheck
        .split_once(" CMD ")
        .expect("HEALTHCHECK ... CMD [...]");
    assert!(text.contains("\nUSER 10001:10001\n"), "not a non-root user");
    assert!(text.contains("\nVOLUME [\"/models\"]\n"), "no model volume");
    serves_and_reports_health(&serve, &strings(health));
}

#[test]
fn the_systemd_unit_verifies_and_its_exec_start_serves() {
    let unit = read("systemd/lsplit-serve.service");
    let exec_start = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let serve: Vec<String> = exec_start.split_whitespace().map(String::from).collect();
    // `verify` wants ExecStart's binary to exist: check a copy that names the one built here.
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("lsplit-serve.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/lsplit", env!("CARGO_BIN_EXE_lsplit")),
    )
    .expect("unit copy");
    let analyze = ["systemd-analyze", "/usr/bin/systemd-analyze"]
        .into_iter()
        .find(|program| Command::new(program).arg("--version").output().is_ok())
        .expect("systemd-analyze (Debian's systemd package; scripts/test.sh installs it)");
    silent_success(Command::new(analyze).arg("verify").arg(&copy));
    let health = [
        "lsplit",
        "health",
        LOCAL_SERVER,
        "--ca",
        "/etc/lsplit/ca.pem",
    ]
    .map(String::from);
    serves_and_reports_health(&serve, &health);
}

#[test]
fn the_kubernetes_manifests_validate_and_the_containers_command_and_probe_work() {
    let manifests = deploy("kubernetes/lsplit-serve.yaml");
    let out = Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&manifests)
        .output()
        .expect("kubernetes-validate");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    for kind in ["deployment", "service"] {
        assert!(
            report.contains(&format!("passed for resource {kind}/lsplit-serve")),
            "{report}"
        );
    }
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&manifests)
        .output()
        .expect("read the manifests");
    let documents: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the manifests as JSON");
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let list = |value: &Value| -> Vec<String> {
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
    };
    let mut serve = list(&container["command"]);
    serve.extend(list(&container["args"]));
    let probe = list(&container["readinessProbe"]["exec"]["command"]);
    serves_and_reports_health(&serve, &probe);
    let service = documents
        .iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Service");
    assert_eq!(service["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "grpc");
}
