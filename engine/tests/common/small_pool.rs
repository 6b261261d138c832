//! A small real file system for a test's pool: an ext4 image, loop-mounted. Included by path
//! (`#[path]`) by the tests that need it, beside `common`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::common::TestEnv;

/// An ext4 file system of `size` bytes in an image file, loop-mounted at `target`. Unmounted
/// lazily on drop, so it goes once the daemon that has files open on it is gone (the `TestEnv`
/// kills it next); the loop device `mount -o loop` made is freed with it.
pub struct SmallPool {
    pub target: PathBuf,
    image: PathBuf,
}

impl SmallPool {
    /// A small file system for `env`'s engine: its pool becomes a directory on it (set before
    /// the engine opens), beside which a test can put files of its own.
    pub fn for_engine(env: &mut TestEnv, size: u64) -> Self {
        let fs = Self::mount(&env.root.join("fs"), size);
        env.cfg.pool = fs.target.join("pool");
        std::fs::create_dir_all(&env.cfg.pool).expect("pool dir");
        fs
    }

    pub fn mount(target: &Path, size: u64) -> Self {
        let image = target.with_extension("img");
        let file = std::fs::File::create(&image).expect("pool image");
        file.set_len(size).expect("pool image size");
        drop(file);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        std::fs::create_dir_all(target).expect("pool dir");
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&image)
            .arg(target));
        Self {
            target: target.to_owned(),
            image,
        }
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.target)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
