//! `verify --fleet` on manifest line objects changed in the bucket: each problem names the
//! object's key (host and line as context), and only what the chain proves — an untouched
//! line after a modified one is not accused, nor are untouched files.

use std::sync::atomic::Ordering;

use super::{BUCKET, Host, finish, s3::S3Server, s3::free_port, tempdir, verify, wait_until};

/// `verify --fleet … --json`: exit code and the problems.
fn problems(args: &[&str]) -> (i32, Vec<String>) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, text) = verify(&all);
    let json: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON report: {text}")),
    )
    .unwrap();
    let problems = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    (code, problems)
}

#[test]
fn a_modified_line_object_is_named_by_its_key_and_the_untouched_next_line_is_not() {
    let dir = tempdir("line-objects");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut host = Host::new(&dir.join("runner-m"), "runner-m");
    for rows in [3, 4, 5] {
        host.add_file(rows);
    }
    let config = host.config(&server.endpoint(), "k", "s");
    let (shipper, _) = host.ship(&config);
    wait_until("three lines shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 3
    });
    finish(&shipper);

    let endpoint = server.endpoint();
    let cred = host.dir.join("ship.cred");
    let key = format!("runner-m={}", host.public_key());
    let synced = server.data.join(BUCKET);
    let bucket_args = vec![
        "--fleet",
        "s3://fleet",
        "--endpoint",
        &endpoint,
        "--allow-http",
        "--credentials-file",
        cred.to_str().unwrap(),
        "--pubkey",
        &key,
    ];
    let synced_args = vec!["--fleet", synced.to_str().unwrap(), "--pubkey", &key];
    assert_eq!(problems(&bucket_args), (0, vec![]));

    let object = |n: u64| server.object(BUCKET, &format!("host=runner-m/_manifest/{n:012}.json"));
    let original = std::fs::read(object(2)).unwrap();
    // Line 2's object rewritten (its row count): named by its key, alone — not line 3, whose
    // `prev` names the original line 2, nor file 2, which is untouched.
    let text = String::from_utf8(original.clone()).unwrap();
    let rows = text.split("\"rows\":").nth(1).unwrap();
    let rows: String = rows.chars().take_while(char::is_ascii_digit).collect();
    std::fs::write(
        object(2),
        text.replacen(&format!("\"rows\":{rows}"), "\"rows\":999", 1),
    )
    .unwrap();
    for (args, prefix) in [
        (&bucket_args, "s3://fleet/".to_owned()),
        (&synced_args, format!("{}/", synced.display())),
    ] {
        let (code, p) = problems(args);
        assert_eq!(code, 1, "{p:?}");
        assert_eq!(
            p,
            vec![format!(
                "{prefix}host=runner-m/_manifest/000000000002.json: manifest line 2 of host runner-m: bad signature: the line was modified"
            )],
            "exactly the modified object"
        );
    }
    // The text report says the same, one TAMPERED line.
    let (code, text) = verify(&bucket_args);
    assert_eq!(code, 1, "{text}");
    assert_eq!(text.matches("TAMPERED").count(), 1, "{text}");
    assert!(!text.contains("000000000003.json"), "{text}");

    // Line 1's object without its newline (restored line 2): the object was modified, its
    // signed content is intact; concatenated, it would have run into line 2.
    std::fs::write(object(2), &original).unwrap();
    let first = std::fs::read(object(1)).unwrap();
    std::fs::write(object(1), &first[..first.len() - 1]).unwrap();
    let (code, p) = problems(&bucket_args);
    assert_eq!(code, 1, "{p:?}");
    assert_eq!(
        p,
        vec![
            "s3://fleet/host=runner-m/_manifest/000000000001.json: manifest line 1 of host runner-m: not stored as written (the object does not end with a newline): modified, though its signed content is intact"
        ]
    );
    // Line 1 holding two lines (a forged one appended): unreadable, named alone.
    let mut two = first.clone();
    two.extend_from_slice(&original);
    std::fs::write(object(1), &two).unwrap();
    let (code, p) = problems(&bucket_args);
    assert_eq!(code, 1, "{p:?}");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(
            "s3://fleet/host=runner-m/_manifest/000000000001.json: manifest line 1 of host runner-m: unreadable"
        ) && p[0].ends_with("(the object holds more than one line)"),
        "{p:?}"
    );
    std::fs::write(object(1), &first).unwrap();

    // The last line object replaced by line 2 (a replay): named, and the file nothing vouches
    // for any more with it.
    let third = std::fs::read(object(3)).unwrap();
    std::fs::write(object(3), &original).unwrap();
    let (code, p) = problems(&bucket_args);
    assert_eq!(code, 1, "{p:?}");
    let last_file = host.local_parquet().last().unwrap().clone();
    assert_eq!(
        p,
        vec![
            "s3://fleet/host=runner-m/_manifest/000000000003.json: manifest line 3 of host runner-m: holds line 2, after line 2: lines were reordered or repeated".to_owned(),
            format!(
                "s3://fleet/host=runner-m/{last_file}: in no manifest line, but its records continue host runner-m's chain after its last line: the manifest's tail was cut, or its line is not written yet"
            ),
        ]
    );
    std::fs::write(object(3), &third).unwrap();
    assert_eq!(problems(&bucket_args), (0, vec![]));
}
