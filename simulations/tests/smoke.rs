//! The `weft-sim` binary end to end: the `lan-10` built-in scenario runs
//! and delivers everything, a bad scenario file exits 2 naming the key,
//! and `--baseline` says it is not built yet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn weft_sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-sim"))
}

#[test]
fn lan_10_delivers_everything() -> anyhow::Result<()> {
    let out = tempfile::tempdir()?;
    let run = weft_sim()
        .args(["run", "lan-10", "--out"])
        .arg(out.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json"))?)?;
    for field in [
        "nodes",
        "messages",
        "delivery_ratio",
        "latency_ms",
        "duplicates_per_message",
        "bytes_per_node",
        "convergence_s",
        "seed",
        "scheduling_lag_ms",
    ] {
        assert!(summary.get(field).is_some(), "no {field} in {summary}");
    }
    for p in ["p50", "p95", "p99", "max"] {
        assert!(summary["latency_ms"][p].is_number(), "{summary}");
    }
    for p in ["p50", "p99", "max"] {
        assert!(summary["scheduling_lag_ms"][p].is_number(), "{summary}");
    }
    assert_eq!(summary["nodes"], 10);
    assert_eq!(summary["seed"], 1);
    assert!(summary["messages"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["delivery_ratio"], 1.0, "{summary}");
    assert_eq!(summary["duplicates_per_message"], 0.0, "{summary}");
    assert!(summary["convergence_s"].is_number(), "{summary}");
    assert_eq!(summary["events_lagged"], 0, "{summary}");

    let csv = std::fs::read_to_string(out.path().join("messages.csv"))?;
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("message_id,conversation,sender,recipient,sent_ms,received_ms,duplicates")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(
        rows.len() as u64,
        summary["expected_deliveries"].as_u64().unwrap()
    );
    assert!(
        rows.iter()
            .all(|r| !r.split(',').nth(5).unwrap().is_empty())
    );
    Ok(())
}

#[test]
fn a_bad_scenario_file_exits_2_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("scenario.toml");
    // Runs the scenario `text`; its exit code and stderr.
    let run = |text: &str| -> anyhow::Result<(Option<i32>, String)> {
        std::fs::write(&file, text)?;
        let run = weft_sim()
            .arg("run")
            .arg(&file)
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()?;
        Ok((
            run.status.code(),
            String::from_utf8_lossy(&run.stderr).into_owned(),
        ))
    };
    let (code, stderr) = run(
        "duration_secs = 5\n[nodes]\naccounts = 3\n[workload]\nmessages_per_sec = 1\nrate_per_sec = 2\n",
    )?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("scenario.toml: unknown key \"workload.rate_per_sec\""),
        "{stderr}"
    );

    let (code, stderr) = run(
        "duration_secs = 5\n[nodes]\naccounts = 3\n[workload]\nmessages_per_sec = 1\n[churn]\noffline = 0.2\n",
    )?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("\"churn\" is not supported yet"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
    Ok(())
}

#[test]
fn baseline_is_not_built_yet_and_scenarios_are_listed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run = weft_sim()
        .args(["run", "lan-10", "--baseline", "--out"])
        .arg(dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`--baseline` is not built yet"), "{stderr}");

    let list = weft_sim().arg("scenarios").output()?;
    assert_eq!(list.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&list.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("lan-10 ")), "{stdout}");
    Ok(())
}
