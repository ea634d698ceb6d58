//! Where an application's secrets and configs live on its node: one directory per
//! application under a root that is a tmpfs the agent mounts itself (mode 0700), so their
//! content never reaches a disk and is gone when the node restarts. Each file is written
//! with its mode and owner, then bind-mounted read-only into the container.
//!
//! Nothing here logs content; errors name files, never their bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flocker_wire::files::{FileMount, to_hex};
use flocker_wire::{Application, FileContent};

/// The default mode of a mounted file, as compose has it.
const DEFAULT_MODE: u32 = 0o444;

/// How large the tmpfs may grow.
const TMPFS_SIZE: &str = "64m";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("file store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot mount a tmpfs on {path} for secrets: {detail}")]
    Mount { path: String, detail: String },
    #[error("application {application:?}: the content of {name:?} was not sent with the request")]
    Missing { application: String, name: String },
    #[error("application {application:?}: the content of {name:?} does not match its digest")]
    Digest { application: String, name: String },
    #[error(
        "application {application:?}: {name:?} is no longer on this node (it restarted, and secrets are kept in memory only); run `flockerctl deploy` again"
    )]
    Gone { application: String, name: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The per-application directories of secrets and configs.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// A store on a tmpfs at `root`, mounted now unless one is already there.
    pub fn on_tmpfs(root: PathBuf) -> Result<Self, FilesError> {
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&root))?;
        if !is_tmpfs_mount(&root)? {
            use nix::mount::{MsFlags, mount};
            let options = format!("mode=0700,size={TMPFS_SIZE}");
            mount(
                Some("tmpfs"),
                &root,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(options.as_str()),
            )
            .map_err(|e| FilesError::Mount {
                path: root.display().to_string(),
                detail: e.to_string(),
            })?;
            tracing::info!(path = %root.display(), "mounted a tmpfs for secrets and configs");
        }
        Ok(FileStore { root })
    }

    /// A store in a plain directory, for tests that run without privileges.
    pub fn in_directory(root: PathBuf) -> Self {
        FileStore { root }
    }

    /// The directory of one application's files.
    pub fn dir(&self, application: &str) -> PathBuf {
        self.root.join(application)
    }

    /// Host path of one mounted file.
    pub fn path(&self, application: &str, mount: &FileMount) -> PathBuf {
        self.dir(application).join(&mount.name)
    }

    /// Checks every file's content against its digest, then writes them all (each to a
    /// new name, then renamed over the old one, so a running container keeps its copy).
    pub fn write(
        &self,
        app: &Application,
        contents: Option<&BTreeMap<String, FileContent>>,
    ) -> Result<(), FilesError> {
        if app.files.is_empty() {
            return Ok(());
        }
        let mut checked = Vec::new();
        for mount in &app.files {
            let content =
                contents
                    .and_then(|c| c.get(&mount.name))
                    .ok_or_else(|| FilesError::Missing {
                        application: app.name.clone(),
                        name: mount.name.clone(),
                    })?;
            if !digest_matches(mount, &content.0) {
                return Err(FilesError::Digest {
                    application: app.name.clone(),
                    name: mount.name.clone(),
                });
            }
            checked.push((mount, content));
        }
        let dir = self.dir(&app.name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        for (mount, content) in checked {
            let path = self.path(&app.name, mount);
            let fresh = dir.join(format!(".{}.new", mount.name));
            let _ = std::fs::remove_file(&fresh);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&fresh)
                .map_err(io(&fresh))?;
            file.write_all(&content.0).map_err(io(&fresh))?;
            drop(file);
            if mount.uid.is_some() || mount.gid.is_some() {
                std::os::unix::fs::chown(&fresh, mount.uid, mount.gid).map_err(io(&fresh))?;
            }
            std::fs::set_permissions(
                &fresh,
                std::fs::Permissions::from_mode(mount.mode.unwrap_or(DEFAULT_MODE)),
            )
            .map_err(io(&fresh))?;
            std::fs::rename(&fresh, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Before a restart without a converge (the supervisor): every file is still here with
    /// its content. Docker would otherwise create an empty directory in place of a missing
    /// bind source.
    pub fn check(&self, app: &Application) -> Result<(), FilesError> {
        for mount in &app.files {
            let path = self.path(&app.name, mount);
            let ok = std::fs::read(&path).is_ok_and(|bytes| digest_matches(mount, &bytes));
            if !ok {
                return Err(FilesError::Gone {
                    application: app.name.clone(),
                    name: mount.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Forgets an application's files (it stopped or moved away).
    pub fn remove(&self, application: &str) -> Result<(), FilesError> {
        let dir = self.dir(application);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }
}

fn digest_matches(mount: &FileMount, content: &[u8]) -> bool {
    to_hex(blake3::hash(content).as_bytes()) == mount.digest
}

/// Whether `path` is itself the mount point of a tmpfs, by `/proc/self/mountinfo`.
fn is_tmpfs_mount(path: &Path) -> Result<bool, FilesError> {
    let path = std::fs::canonicalize(path).map_err(io(path))?;
    let info = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(info).map_err(io(info))?;
    // Fields: id parent major:minor root mount-point options ... - fstype source options.
    Ok(text.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or("");
        let fstype = right.split(' ').next().unwrap_or("");
        fstype == "tmpfs" && Path::new(&unescape_octal(mount_point)) == path
    }))
}

/// mountinfo escapes space, tab, newline and backslash as `\NNN`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(Ok(v)) = field.get(i + 1..i + 4).map(|d| u8::from_str_radix(d, 8))
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use flocker_wire::{FileKind, Image, RestartPolicy};

    use super::*;

    fn app_with(files: Vec<FileMount>) -> Application {
        Application {
            name: "db".into(),
            image: Image {
                repository: "x".into(),
                tag: "latest".into(),
            },
            ports: vec![],
            volumes: Default::default(),
            volume: None,
            environment: BTreeMap::new(),
            links: vec![],
            mem_limit: None,
            cpu_shares: None,
            restart_policy: RestartPolicy::Never,
            container: Default::default(),
            depends_on: Vec::new(),
            files,
            health_check: None,
        }
    }

    fn mount(name: &str, content: &[u8], mode: Option<u32>) -> FileMount {
        FileMount {
            name: name.into(),
            kind: FileKind::Secret,
            target: format!("/run/secrets/{name}"),
            mode,
            uid: None,
            gid: None,
            digest: to_hex(blake3::hash(content).as_bytes()),
        }
    }

    #[test]
    fn files_are_written_with_their_mode_checked_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::in_directory(dir.path().to_path_buf());
        let app = app_with(vec![mount("password", b"hunter2", Some(0o400))]);
        let contents = BTreeMap::from([("password".to_owned(), FileContent(b"hunter2".to_vec()))]);
        store.write(&app, Some(&contents)).expect("write");
        let path = store.path("db", &app.files[0]);
        assert_eq!(std::fs::read(&path).expect("read"), b"hunter2");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o7777,
            0o400
        );
        store.check(&app).expect("present");

        store.remove("db").expect("remove");
        assert!(matches!(store.check(&app), Err(FilesError::Gone { .. })));
    }

    #[test]
    fn content_that_does_not_match_its_digest_or_is_missing_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::in_directory(dir.path().to_path_buf());
        let app = app_with(vec![mount("password", b"hunter2", None)]);
        let wrong = BTreeMap::from([("password".to_owned(), FileContent(b"other".to_vec()))]);
        assert!(matches!(
            store.write(&app, Some(&wrong)),
            Err(FilesError::Digest { .. })
        ));
        assert!(matches!(
            store.write(&app, None),
            Err(FilesError::Missing { .. })
        ));
        assert!(!store.dir("db").exists(), "nothing written on refusal");
    }

    #[test]
    fn mountinfo_escapes_are_read() {
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(unescape_octal("/plain"), "/plain");
    }
}
