//! What to do about a stage or publish path, decided from what the mount table says is there.
//! Pure: the I/O shell ([`super::mounts`]) gathers a [`Mounted`] and a [`Wanted`], this module
//! answers, and the CSI Node service acts on the answer. A repeated request is a no-op; anything
//! else mounted there is refused untouched, never stacked over or replaced.

use std::collections::BTreeSet;
use std::fmt;

use rustix::mount::MountFlags;

/// A device number (`st_dev` / `st_rdev`), as mountinfo's `major:minor` field shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// Parses mountinfo's `major:minor` field.
    pub fn parse(field: &str) -> Option<Self> {
        let (major, minor) = field.split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The topmost mount at a path: what mountinfo says, plus what a `stat` of the path shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The filesystem the mount shows (mountinfo `major:minor`).
    pub filesystem: DevId,
    /// Which directory of that filesystem the mount shows (mountinfo root; `/` for a whole one).
    pub root: String,
    pub fs_type: String,
    /// The mount source as the kernel reports it (a device path, `tmpfs`, ...), for messages.
    pub source: Option<String>,
    /// Per-mount options (`ro` or `rw`, `nosuid`, `noatime`, ...).
    pub options: BTreeSet<String>,
    /// The device number, when the path itself is a block device node (a bind-mounted device).
    pub block_device: Option<DevId>,
}

impl Mounted {
    pub fn read_only(&self) -> bool {
        self.options.contains("ro")
    }

    /// A one-line account of the mount for error messages.
    pub fn describe(&self) -> String {
        let source = self.source.as_deref().unwrap_or("none");
        let mode = if self.read_only() { "ro" } else { "rw" };
        match self.block_device {
            Some(device) => format!("block device {device} ({mode})"),
            None if self.root == "/" => format!("{} from {source} ({mode})", self.fs_type),
            None => format!(
                "{} from {source}, directory {} ({mode})",
                self.fs_type, self.root
            ),
        }
    }
}

/// What the request wants to find at the path once it is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A filesystem of `fs_type` on the block device, mounted whole (NodeStage, mount access).
    Filesystem { device: DevId, fs_type: String },
    /// A bind of the staging mount: the same filesystem and directory (NodePublish, mount access).
    BindOf { filesystem: DevId, root: String },
    /// The block device node itself, bind-mounted onto a file (NodePublish, block access).
    DeviceNode { device: DevId },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub source: Source,
    pub read_only: bool,
    /// Per-mount options the request asked for that mountinfo shows (see [`MountOptions`]).
    pub options: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is mounted there: mount.
    NotMounted,
    /// The request is already done (a repeat): succeed without touching anything.
    AlreadyDone,
    /// Something else is mounted there: refuse, and leave it as it is.
    Conflict(String),
}

/// The decision table. `existing` is the topmost mount at the path, if any.
pub fn decide(existing: Option<&Mounted>, wanted: &Wanted) -> Decision {
    let Some(existing) = existing else {
        return Decision::NotMounted;
    };
    if let Some(mismatch) = source_mismatch(existing, &wanted.source) {
        return Decision::Conflict(format!(
            "{mismatch}: {} is mounted there",
            existing.describe()
        ));
    }
    if existing.read_only() != wanted.read_only {
        let (want, have) = if wanted.read_only {
            ("read-only", "read-write")
        } else {
            ("read-write", "read-only")
        };
        return Decision::Conflict(format!(
            "the request is {want} but the volume is already mounted there {have}"
        ));
    }
    let missing: Vec<&str> = wanted
        .options
        .difference(&existing.options)
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Decision::Conflict(format!(
            "the volume is already mounted there without the requested option(s) {}",
            missing.join(",")
        ));
    }
    Decision::AlreadyDone
}

/// Why the existing mount is not the wanted source, or `None` when it is.
fn source_mismatch(existing: &Mounted, wanted: &Source) -> Option<String> {
    match wanted {
        Source::Filesystem { device, fs_type } => {
            if existing.filesystem != *device || existing.root != "/" {
                Some(format!("the volume's device is {device}"))
            } else if existing.fs_type != *fs_type {
                Some(format!("the requested filesystem is {fs_type}"))
            } else {
                None
            }
        }
        Source::BindOf { filesystem, root } => (existing.filesystem != *filesystem
            || existing.root != *root
            || existing.block_device.is_some())
        .then(|| {
            format!("the volume's staging mount is filesystem {filesystem}, directory {root}")
        }),
        Source::DeviceNode { device } => (existing.block_device != Some(*device))
            .then(|| format!("the volume's block device is {device}")),
    }
}

/// A request's mount flags (CSI `mount_flags`) split the way mount(8) splits them: options the
/// VFS knows become `mount(2)` flags, the rest go to the filesystem as its data string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MountFlags,
    /// Filesystem-specific options (`discard`, `errors=remount-ro`, ...), in request order.
    pub data: Vec<String>,
    /// The per-mount options among the flags that mountinfo lists, to check a repeat against.
    pub visible: BTreeSet<String>,
}

impl MountOptions {
    pub fn read_only(&self) -> bool {
        self.flags.contains(MountFlags::RDONLY)
    }

    /// The data string for `mount(2)`, or `None` when there is none.
    pub fn data(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// How one VFS option acts: sets a flag, clears one, or is a no-op word like `defaults`.
enum Vfs {
    Set(MountFlags, Option<&'static str>),
    Clear(MountFlags, &'static str),
    Nothing,
}

fn vfs_option(option: &str) -> Option<Vfs> {
    use MountFlags as F;
    Some(match option {
        "ro" => Vfs::Set(F::RDONLY, Some("ro")),
        "rw" => Vfs::Clear(F::RDONLY, "ro"),
        "nosuid" => Vfs::Set(F::NOSUID, Some("nosuid")),
        "suid" => Vfs::Clear(F::NOSUID, "nosuid"),
        "nodev" => Vfs::Set(F::NODEV, Some("nodev")),
        "dev" => Vfs::Clear(F::NODEV, "nodev"),
        "noexec" => Vfs::Set(F::NOEXEC, Some("noexec")),
        "exec" => Vfs::Clear(F::NOEXEC, "noexec"),
        "noatime" => Vfs::Set(F::NOATIME, Some("noatime")),
        "nodiratime" => Vfs::Set(F::NODIRATIME, Some("nodiratime")),
        "relatime" => Vfs::Set(F::RELATIME, Some("relatime")),
        "strictatime" => Vfs::Set(F::STRICTATIME, None),
        "lazytime" => Vfs::Set(F::LAZYTIME, None),
        "sync" => Vfs::Set(F::SYNCHRONOUS, None),
        "async" => Vfs::Clear(F::SYNCHRONOUS, ""),
        "dirsync" => Vfs::Set(F::DIRSYNC, None),
        "defaults" => Vfs::Nothing,
        _ => return None,
    })
}

/// Splits CSI mount flags (each may itself be a comma-separated list) into flags and data.
pub fn mount_options(requested: &[String]) -> MountOptions {
    let mut options = MountOptions {
        flags: MountFlags::empty(),
        data: Vec::new(),
        visible: BTreeSet::new(),
    };
    for option in requested
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        match vfs_option(option) {
            Some(Vfs::Set(flag, shown)) => {
                options.flags |= flag;
                options.visible.extend(shown.map(String::from));
            }
            Some(Vfs::Clear(flag, shown)) => {
                options.flags -= flag;
                options.visible.remove(shown);
            }
            Some(Vfs::Nothing) => {}
            None => options.data.push(option.to_string()),
        }
    }
    // `ro` is checked on its own (the read-only flag), not as a missing option.
    options.visible.remove("ro");
    options
}

/// Mount points in mountinfo are escaped by the kernel (space, tab, newline and backslash as
/// `\ooo`); procfs hands them over as they are, so a path is escaped the same way to compare.
pub fn mountinfo_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOP3: DevId = DevId { major: 7, minor: 3 };
    const LOOP4: DevId = DevId { major: 7, minor: 4 };
    const DEVTMPFS: DevId = DevId { major: 0, minor: 5 };

    fn options(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|o| o.to_string()).collect()
    }

    fn filesystem(device: DevId, fs_type: &str, opts: &[&str]) -> Mounted {
        Mounted {
            filesystem: device,
            root: "/".into(),
            fs_type: fs_type.into(),
            source: Some(format!("/dev/loop{}", device.minor)),
            options: options(opts),
            block_device: None,
        }
    }

    fn tmpfs() -> Mounted {
        Mounted {
            filesystem: DevId {
                major: 0,
                minor: 61,
            },
            root: "/".into(),
            fs_type: "tmpfs".into(),
            source: Some("foreign".into()),
            options: options(&["rw", "relatime"]),
            block_device: None,
        }
    }

    fn device_node(device: DevId, mode: &str) -> Mounted {
        Mounted {
            filesystem: DEVTMPFS,
            root: format!("/loop{}", device.minor),
            fs_type: "devtmpfs".into(),
            source: Some("udev".into()),
            options: options(&[mode, "nosuid"]),
            block_device: Some(device),
        }
    }

    fn stage(device: DevId, fs_type: &str, flags: &[&str]) -> Wanted {
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let parsed = mount_options(&flags);
        Wanted {
            source: Source::Filesystem {
                device,
                fs_type: fs_type.into(),
            },
            read_only: parsed.read_only(),
            options: parsed.visible,
        }
    }

    fn publish(read_only: bool) -> Wanted {
        Wanted {
            source: Source::BindOf {
                filesystem: LOOP3,
                root: "/".into(),
            },
            read_only,
            options: BTreeSet::new(),
        }
    }

    fn publish_block(device: DevId, read_only: bool) -> Wanted {
        Wanted {
            source: Source::DeviceNode { device },
            read_only,
            options: BTreeSet::new(),
        }
    }

    fn is_conflict(decision: Decision) -> bool {
        matches!(decision, Decision::Conflict(_))
    }

    #[test]
    fn nothing_mounted_means_mount() {
        assert_eq!(
            decide(None, &stage(LOOP3, "ext4", &[])),
            Decision::NotMounted
        );
        assert_eq!(decide(None, &publish(true)), Decision::NotMounted);
        assert_eq!(
            decide(None, &publish_block(LOOP3, false)),
            Decision::NotMounted
        );
    }

    #[test]
    fn stage_repeat_is_already_done() {
        let mounted = filesystem(LOOP3, "ext4", &["rw", "relatime"]);
        assert_eq!(
            decide(Some(&mounted), &stage(LOOP3, "ext4", &[])),
            Decision::AlreadyDone
        );
        let with_flags = filesystem(LOOP3, "xfs", &["ro", "noatime", "nodev"]);
        assert_eq!(
            decide(
                Some(&with_flags),
                &stage(LOOP3, "xfs", &["ro,noatime", "nodev", "discard"])
            ),
            Decision::AlreadyDone,
            "filesystem data options (discard) are not checked against mountinfo"
        );
    }

    #[test]
    fn stage_over_something_else_is_a_conflict() {
        let wanted = stage(LOOP3, "ext4", &[]);
        let Decision::Conflict(message) = decide(Some(&tmpfs()), &wanted) else {
            panic!("tmpfs at the staging path must conflict");
        };
        assert!(message.contains("tmpfs from foreign"), "{message}");
        assert!(is_conflict(decide(
            Some(&filesystem(LOOP4, "ext4", &["rw"])),
            &wanted
        )));
        assert!(is_conflict(decide(
            Some(&filesystem(LOOP3, "xfs", &["rw"])),
            &wanted
        )));
        let mut subdirectory = filesystem(LOOP3, "ext4", &["rw"]);
        subdirectory.root = "/lost+found".into();
        assert!(is_conflict(decide(Some(&subdirectory), &wanted)));
    }

    #[test]
    fn stage_with_other_flags_is_a_conflict() {
        let mounted = filesystem(LOOP3, "ext4", &["rw", "relatime"]);
        assert!(is_conflict(decide(
            Some(&mounted),
            &stage(LOOP3, "ext4", &["ro"])
        )));
        assert!(is_conflict(decide(
            Some(&mounted),
            &stage(LOOP3, "ext4", &["noexec"])
        )));
        let read_only = filesystem(LOOP3, "ext4", &["ro"]);
        assert!(is_conflict(decide(
            Some(&read_only),
            &stage(LOOP3, "ext4", &[])
        )));
    }

    #[test]
    fn publish_repeat_is_already_done() {
        let bind_rw = filesystem(LOOP3, "ext4", &["rw", "relatime"]);
        assert_eq!(
            decide(Some(&bind_rw), &publish(false)),
            Decision::AlreadyDone
        );
        let bind_ro = filesystem(LOOP3, "ext4", &["ro", "relatime"]);
        assert_eq!(
            decide(Some(&bind_ro), &publish(true)),
            Decision::AlreadyDone
        );
        assert_eq!(
            decide(Some(&device_node(LOOP3, "ro")), &publish_block(LOOP3, true)),
            Decision::AlreadyDone
        );
    }

    #[test]
    fn publish_read_only_onto_a_read_write_bind_is_a_conflict() {
        let bind_rw = filesystem(LOOP3, "ext4", &["rw"]);
        let Decision::Conflict(message) = decide(Some(&bind_rw), &publish(true)) else {
            panic!("ro onto rw must conflict");
        };
        assert!(message.contains("read-only"), "{message}");
        let bind_ro = filesystem(LOOP3, "ext4", &["ro"]);
        assert!(is_conflict(decide(Some(&bind_ro), &publish(false))));
        assert!(is_conflict(decide(
            Some(&device_node(LOOP3, "rw")),
            &publish_block(LOOP3, true)
        )));
    }

    #[test]
    fn publish_over_another_source_is_a_conflict() {
        assert!(is_conflict(decide(Some(&tmpfs()), &publish(false))));
        assert!(is_conflict(decide(
            Some(&filesystem(LOOP4, "ext4", &["rw"])),
            &publish(false)
        )));
        assert!(is_conflict(decide(
            Some(&device_node(LOOP4, "rw")),
            &publish_block(LOOP3, false)
        )));
        // A file with something other than a device node bound onto it.
        assert!(is_conflict(decide(
            Some(&tmpfs()),
            &publish_block(LOOP3, false)
        )));
        // The device node where a bind of the staging directory belongs.
        let mut node_of_staging_fs = device_node(LOOP3, "rw");
        node_of_staging_fs.filesystem = LOOP3;
        node_of_staging_fs.root = "/".into();
        assert!(is_conflict(decide(
            Some(&node_of_staging_fs),
            &publish(false)
        )));
    }

    #[test]
    fn mount_flags_split_into_vfs_flags_and_filesystem_data() {
        let parsed = mount_options(&[
            "noatime,nodev".into(),
            "discard".into(),
            "errors=remount-ro".into(),
            "defaults".into(),
        ]);
        assert_eq!(parsed.flags, MountFlags::NOATIME | MountFlags::NODEV);
        assert_eq!(parsed.data(), Some("discard,errors=remount-ro".into()));
        assert_eq!(parsed.visible, options(&["noatime", "nodev"]));
        assert!(!parsed.read_only());

        let later_wins = mount_options(&["ro".into(), "noexec".into(), "rw,exec".into()]);
        assert!(later_wins.flags.is_empty());
        assert!(later_wins.visible.is_empty());
        assert_eq!(later_wins.data(), None);
        assert!(mount_options(&["ro".into()]).read_only());
    }

    #[test]
    fn paths_are_escaped_as_mountinfo_shows_them() {
        assert_eq!(mountinfo_escape("/plain/path"), "/plain/path");
        assert_eq!(
            mountinfo_escape("/with space\tand\\slash"),
            "/with\\040space\\011and\\134slash"
        );
    }

    #[test]
    fn device_numbers_parse_from_mountinfo() {
        assert_eq!(DevId::parse("7:3"), Some(LOOP3));
        assert_eq!(
            DevId::parse("259:0").map(|d| d.to_string()),
            Some("259:0".into())
        );
        assert_eq!(DevId::parse("7"), None);
        assert_eq!(DevId::parse("a:b"), None);
    }
}
