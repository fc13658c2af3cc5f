//! The linearizability checker against Jepsen's etcd register histories and their verdicts
//! (`tests/data/jepsen-etcd/VERDICTS`, kept in the repository with their source and licence;
//! `FLOTILLA_JEPSEN_DIR` points elsewhere).

use std::collections::BTreeMap;
use std::path::PathBuf;

use flotilla::lincheck::{self, CheckLimits, Verdict};

fn testdata_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_JEPSEN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/jepsen-etcd"),
        PathBuf::from,
    )
}

/// `FILE VERDICT` per line, as a map.
fn expected_verdicts(dir: &std::path::Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("VERDICTS"))
        .unwrap_or_else(|error| panic!("cannot read {}/VERDICTS: {error}", dir.display()));
    let mut verdicts = BTreeMap::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let (Some(file), Some(verdict), None) = (fields.next(), fields.next(), fields.next())
        else {
            panic!("malformed VERDICTS line {line:?}");
        };
        assert!(
            matches!(verdict, "linearizable" | "not-linearizable"),
            "unknown verdict in {line:?}"
        );
        let previous = verdicts.insert(file.to_owned(), verdict.to_owned());
        assert!(previous.is_none(), "{file} listed twice");
    }
    verdicts
}

#[test]
fn every_jepsen_etcd_verdict_holds() {
    let dir = testdata_dir();
    let expected = expected_verdicts(&dir);
    assert!(!expected.is_empty(), "VERDICTS lists no history");

    let mut logs_on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("the testdata folder is readable")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".log"))
        .collect();
    logs_on_disk.sort();
    let unlisted: Vec<_> = logs_on_disk
        .iter()
        .filter(|log| !expected.contains_key(*log))
        .collect();
    assert!(
        unlisted.is_empty(),
        "histories without a verdict: {unlisted:?}"
    );

    let mut wrong = Vec::new();
    for (file, verdict) in &expected {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{file} is listed but unreadable: {error}"));
        let history = lincheck::jepsen::parse(&text)
            .unwrap_or_else(|error| panic!("{file} does not parse: {error}"));
        assert!(!history.is_empty(), "{file} holds no operation");
        let report = lincheck::check(&history, CheckLimits::default());
        let found = match report.verdict {
            Verdict::Linearizable => "linearizable",
            Verdict::NotLinearizable(_) => "not-linearizable",
            Verdict::Unknown { .. } => "unknown",
        };
        if found != verdict {
            wrong.push(format!("{file}: expected {verdict}, found {found}"));
        }
    }
    assert!(wrong.is_empty(), "verdicts differ:\n{}", wrong.join("\n"));
}
