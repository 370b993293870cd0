//! The Debian package that `script/package` builds: its fields and its files, and then the real
//! thing: unpacked over a private copy of this PostgreSQL installation (the system one, which
//! the other suites use, is left alone), a server runs the package's library, creates the
//! extension at this version and at the archived old one, updates the old one, and publishes an
//! event that a real consumer receives from RabbitMQ.
//!
//! The package is `$OUTBOX_DEB` when set (`script/test` builds it once), else `script/package
//! --debug` builds it here for `$PG_CONFIG` (the same files, unoptimised: seconds once
//! `script/setup` has built the extension).

use pg_outbox_tests::install::{pg_config, PgDirs, PrivateInstall};
use pg_outbox_tests::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(90);

/// Runs `c`, asserts it succeeded, returns its stdout.
fn run(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"));
    assert!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The package: `$OUTBOX_DEB`, or the last line `script/package --debug` prints (a debug build:
/// the same files, unoptimised, and quick when `script/setup` has built the extension).
fn package(pg_config: &Path) -> PathBuf {
    if let Some(deb) = std::env::var_os("OUTBOX_DEB") {
        return PathBuf::from(deb);
    }
    let started = Instant::now();
    let mut script = repo_script("package");
    script.arg("--debug").arg("--pg-config").arg(pg_config).stderr(Stdio::inherit());
    let stdout = run(&mut script);
    eprintln!("script/package --debug took {:?}", started.elapsed());
    PathBuf::from(stdout.lines().last().expect("script/package printed nothing"))
}

/// The value of a field of the package's control file.
fn field(deb: &Path, name: &str) -> String {
    run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name)).trim().to_string()
}

#[test]
fn the_debian_package_installs_where_postgres_looks_and_publishes() {
    let _alone = exclusive();
    let started = Instant::now();
    // The PostgreSQL the harness runs ($PG_CONFIG, else the pg_config on the PATH), named by its
    // own pg_config (Debian's /usr/bin/pg_config is a wrapper).
    let system = PgDirs::of(&pg_config());
    let system_pg_config = system.bin.join("pg_config");
    let version_line = run(Command::new(&system_pg_config).arg("--version")).trim().to_string();
    let major = version_line
        .strip_prefix("PostgreSQL ")
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no major version in {version_line:?}"))
        .to_string();
    let pkglibdir = system.pkglib.to_str().unwrap().to_string();
    let extdir = system.share_ext().to_str().unwrap().to_string();
    let version = extension_version();
    let arch = run(Command::new("dpkg").arg("--print-architecture")).trim().to_string();

    // The package, as dpkg sees it.
    let deb = package(&system_pg_config);
    let name = format!("postgresql-{major}-pg-outbox");
    assert!(deb.is_absolute(), "{deb:?} is not an absolute path");
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("{name}_{version}_{arch}.deb"),
        "Debian's name for an extension package"
    );
    assert_eq!(field(&deb, "Package"), name);
    assert_eq!(field(&deb, "Version"), version);
    assert_eq!(field(&deb, "Architecture"), arch);
    assert_eq!(field(&deb, "Section"), "database");
    assert_eq!(field(&deb, "Priority"), "optional");
    assert!(!field(&deb, "Maintainer").is_empty());
    assert!(!field(&deb, "Description").is_empty());
    let depends: Vec<String> = field(&deb, "Depends").split(',').map(|d| d.trim().to_string()).collect();
    assert!(depends.contains(&format!("postgresql-{major}")), "Depends: {depends:?}");
    for lib in ["libc6", "libgcc-s1"] {
        assert!(
            depends.iter().any(|d| d == lib || d.starts_with(&format!("{lib} ("))),
            "Depends: {depends:?}"
        );
    }
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(
        info.lines()
            .any(|l| l.trim_start().starts_with("Depends: ") && l.contains(&format!("postgresql-{major}"))),
        "dpkg-deb --info:\n{info}"
    );

    // Its files, at the paths of this PostgreSQL.
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| l.split_whitespace().last().unwrap().trim_start_matches('.').to_string())
        .collect();
    let mut expected = BTreeSet::from([
        format!("{pkglibdir}/pg_outbox.so"),
        format!("{extdir}/pg_outbox.control"),
        format!("{extdir}/pg_outbox--{version}.sql"),
    ]);
    for dir in ["sql", "sql/archive"] {
        for entry in fs::read_dir(repo().join(dir)).unwrap() {
            let file = entry.unwrap().file_name().to_string_lossy().to_string();
            if file.starts_with("pg_outbox--") && file.ends_with(".sql") {
                expected.insert(format!("{extdir}/{file}"));
            }
        }
    }
    assert!(expected.contains(&format!("{extdir}/pg_outbox--0.1.0--0.2.0.sql")));
    assert!(expected.contains(&format!("{extdir}/pg_outbox--0.1.0.sql")));
    assert!(expected.contains(&format!("{extdir}/pg_outbox--0.2.0--0.3.0.sql")));
    assert!(expected.contains(&format!("{extdir}/pg_outbox--0.2.0.sql")));
    for file in &expected {
        assert!(files.contains(file), "{file} missing from the package:\n{listing}");
    }
    let ours = |f: &&String| f.starts_with(&format!("{pkglibdir}/")) || f.starts_with(&format!("{extdir}/"));
    assert_eq!(
        files.iter().filter(ours).cloned().collect::<BTreeSet<_>>(),
        expected,
        "what the package puts into PostgreSQL"
    );
    assert!(
        files.iter().all(|f| ours(&f) || f.starts_with(&format!("/usr/share/doc/{name}/"))),
        "files outside PostgreSQL's directories and the package's documentation:\n{listing}"
    );

    // Unpacked over a copy of this PostgreSQL that holds no pg_outbox of its own: each file
    // lands where the copy's Postgres looks. Dropped last: the cluster (declared after it)
    // stops before its programs go.
    let install = PrivateInstall::copy_of(&system_pg_config);
    install.remove_extension("pg_outbox");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&install.root));
    for file in &expected {
        let in_copy = match file.strip_prefix(&format!("{pkglibdir}/")) {
            Some(lib) => install.pkglib.join(lib),
            None => install.share_ext.join(file.strip_prefix(&format!("{extdir}/")).unwrap()),
        };
        assert!(in_copy.is_file(), "{file} not unpacked to {}", in_copy.display());
    }
    // Postgres resolves its directories from the real path of its programs.
    let copy_pkglibdir = install.pkglib.canonicalize().unwrap();

    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let cluster = Cluster::init_with_bin(&install.bin, &[]);
    cluster.start_server();
    cluster.admin().batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let mut admin = cluster.admin();
    let server_pkglibdir: String =
        admin.query_one("SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'", &[]).unwrap().get(0);
    assert_eq!(PathBuf::from(server_pkglibdir), copy_pkglibdir);
    let library = copy_pkglibdir.join("pg_outbox.so");
    let worker = cluster.wait_for_worker();
    let maps = fs::read_to_string(format!("/proc/{worker}/maps")).unwrap();
    assert!(maps.contains(library.to_str().unwrap()), "the worker has not mapped {}", library.display());
    assert!(!maps.contains(&format!(" {pkglibdir}/pg_outbox.so")), "the worker mapped the system's library");
    let versions: Vec<String> = admin
        .query(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'pg_outbox' ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(versions.contains(&"0.1.0".to_string()) && versions.contains(&version), "{versions:?}");

    // The archived old version installs from the package's scripts and updates to this one.
    admin.batch_execute("CREATE DATABASE old").unwrap();
    let mut old = cluster.connect("old");
    old.batch_execute("CREATE EXTENSION pg_outbox VERSION '0.1.0'").unwrap();
    old.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    let updated: String =
        old.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0);
    assert_eq!(updated, version);

    // This version publishes, to a real consumer.
    let mut db = cluster.client();
    let installed: String =
        db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0);
    assert_eq!(installed, version);
    let id: String = db
        .query_one(
            "SELECT outbox.publish('PackageInstalled', jsonb_build_object('package', $1::text),
                                   aggregate_id => 'deb', exchange => $2)::text",
            &[&name, &exchange.name],
        )
        .unwrap()
        .get(0);
    let got = consumer.wait_for(1, WITHIN);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id.as_deref(), Some(id.as_str()));
    assert_eq!(got[0].message_type.as_deref(), Some("PackageInstalled"));
    assert_eq!(got[0].json()["package"], name);
    cluster.wait_drained(WITHIN);
    eprintln!("package test took {:?}", started.elapsed());
}

/// The extension's version: `[package] version` of the repository's Cargo.toml.
fn extension_version() -> String {
    let manifest = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let mut in_package = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_package = line.trim() == "[package]";
        } else if in_package && line.starts_with("version") {
            if let Some(v) = line.split('"').nth(1) {
                return v.to_string();
            }
        }
    }
    panic!("no [package] version in Cargo.toml")
}
