//! A private copy of a Postgres installation, so that a test can put another build of the
//! extension into it (an old release, say) without touching the installation every other test
//! loads. Postgres finds its library and share directories relative to the real path of its
//! binary, so the copy keeps the original's layout under a root of its own, and its programs
//! are copies, not links. Deleted on drop (kept, like a cluster, when the test panicked or
//! `OUTBOX_KEEP_CLUSTERS` is set).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct PrivateInstall {
    /// Everything is under here: `<root>/<bindir>`, `<root>/<pkglibdir>`, `<root>/<sharedir>`.
    pub root: PathBuf,
    /// The programs (`initdb`, `pg_ctl`, `postgres`, ...): pass it to [`Cluster::init_with_bin`].
    ///
    /// [`Cluster::init_with_bin`]: crate::Cluster::init_with_bin
    pub bin: PathBuf,
    /// Where `$libdir` (shared libraries) points.
    pub pkglib: PathBuf,
    /// `<sharedir>/extension`: control files and SQL scripts.
    pub share_ext: PathBuf,
}

/// The directories of a Postgres installation, as its `pg_config` reports them.
pub struct PgDirs {
    pub bin: PathBuf,
    pub pkglib: PathBuf,
    pub share: PathBuf,
}

impl PgDirs {
    pub fn of(pg_config: &Path) -> PgDirs {
        let ask = |flag: &str| {
            let out = Command::new(pg_config)
                .arg(flag)
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", pg_config.display()));
            assert!(out.status.success(), "{} {flag} failed", pg_config.display());
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        };
        PgDirs { bin: ask("--bindir"), pkglib: ask("--pkglibdir"), share: ask("--sharedir") }
    }

    pub fn share_ext(&self) -> PathBuf {
        self.share.join("extension")
    }

    /// The same directories under `root`: where a staging tree (`cargo pgrx package`'s output,
    /// a private copy) holds them.
    pub fn under(&self, root: &Path) -> PgDirs {
        PgDirs {
            bin: under(root, &self.bin),
            pkglib: under(root, &self.pkglib),
            share: under(root, &self.share),
        }
    }
}

/// The `pg_config` the harness uses: `$PG_CONFIG`, else the one on the PATH.
pub fn pg_config() -> PathBuf {
    std::env::var_os("PG_CONFIG").map_or_else(|| "pg_config".into(), PathBuf::from)
}

/// Copies `from` (a file or a directory, links followed) to `to`, keeping permissions.
fn copy(from: &Path, to: &Path) {
    let out = Command::new("cp").args(["-RL", "--preserve=mode"]).arg(from).arg(to).output().expect("run cp");
    assert!(
        out.status.success(),
        "cp {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates `dir` and its missing parents under `root`, each readable by everyone (the server
/// runs as `postgres`).
fn make_dirs(root: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut d = dir;
    while d.starts_with(root) {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
}

/// `abs` (absolute) moved under `root`.
fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// The extension's files in a directory: `pg_outbox.so`, `pg_outbox.control`,
/// `pg_outbox--*.sql`.
fn files_of(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name == format!("{extension}.so")
                || name == format!("{extension}.control")
                || (name.starts_with(&format!("{extension}--")) && name.ends_with(".sql"))
        })
        .collect();
    files.sort();
    files
}

impl PrivateInstall {
    /// A copy of the installation `pg_config` describes (programs, `pkglibdir`, `sharedir`;
    /// some 50 MB) in a new directory under the temporary directory. Its name ends with our
    /// pid, like a cluster's, so `script/test` removes it if a run dies.
    pub fn copy_of(pg_config: &Path) -> PrivateInstall {
        static N: AtomicU32 = AtomicU32::new(0);
        let dirs = PgDirs::of(pg_config);
        let root = std::env::temp_dir().join(format!(
            "pg_outbox_test_install-{}_{}",
            N.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&root);
        let copied = dirs.under(&root);
        for (original, copy_dir) in
            [(&dirs.bin, &copied.bin), (&dirs.pkglib, &copied.pkglib), (&dirs.share, &copied.share)]
        {
            if copy_dir.exists() {
                continue; // inside a directory copied already
            }
            make_dirs(&root, copy_dir.parent().unwrap());
            copy(original, copy_dir);
        }
        let share_ext = copied.share_ext();
        let install = PrivateInstall { bin: copied.bin, pkglib: copied.pkglib, share_ext, root };
        // The copy must find itself, not the original.
        let copied = PgDirs::of(&install.bin.join("pg_config"));
        assert_eq!(copied.share_ext(), install.share_ext, "the copy of Postgres is not relocatable");
        assert_eq!(copied.pkglib, install.pkglib, "the copy of Postgres is not relocatable");
        install
    }

    /// Removes every file of `extension`: library, control file, SQL scripts.
    pub fn remove_extension(&self, extension: &str) {
        for f in files_of(&self.pkglib, extension).into_iter().chain(files_of(&self.share_ext, extension)) {
            fs::remove_file(&f).unwrap_or_else(|e| panic!("remove {}: {e}", f.display()));
        }
    }

    /// Copies in the files of `extension` found in `pkglib` (the library) and `share_ext`
    /// (control file and SQL scripts); returns their names.
    pub fn add_extension(&self, extension: &str, pkglib: &Path, share_ext: &Path) -> Vec<String> {
        let lib = files_of(pkglib, extension);
        assert!(!lib.is_empty(), "no {extension}.so in {}", pkglib.display());
        let share = files_of(share_ext, extension);
        assert!(!share.is_empty(), "no {extension} control file or scripts in {}", share_ext.display());
        let mut names = Vec::new();
        for (files, to) in [(lib, &self.pkglib), (share, &self.share_ext)] {
            for f in files {
                copy(&f, &to.join(f.file_name().unwrap()));
                names.push(f.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        names
    }

    /// Copies in the extension as installed in the Postgres `pg_config` describes.
    pub fn add_extension_from(&self, extension: &str, pg_config: &Path) -> Vec<String> {
        let dirs = PgDirs::of(pg_config);
        self.add_extension(extension, &dirs.pkglib, &dirs.share_ext())
    }
}

impl Drop for PrivateInstall {
    fn drop(&mut self) {
        if std::env::var_os("OUTBOX_KEEP_CLUSTERS").is_none() && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.root);
        } else {
            eprintln!("private Postgres installation kept in {}", self.root.display());
        }
    }
}
