//! The node plugin's kubelet registration server, called as kubelet's plugin watcher calls it:
//! GetInfo then NotifyRegistrationStatus, over the unix socket in the registry directory.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use livedisk_csi::node::registration::RegistrationHandle;
use livedisk_csi_proto::pluginregistration::registration_client::RegistrationClient;
use livedisk_csi_proto::pluginregistration::{InfoRequest, RegistrationStatus};
use tonic::transport::{Channel, Endpoint, Uri};

const KUBELET_CSI_SOCKET: &str = "/var/lib/kubelet/plugins/csi.livedisk.io/csi.sock";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("livedisk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn client(socket: &Path) -> RegistrationClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::1]:1")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    RegistrationClient::new(channel)
}

#[tokio::test]
async fn kubelet_gets_the_driver_info_and_its_verdict_is_kept() {
    let dir = temp_dir("registration");
    let server = RegistrationHandle::start(&dir, Path::new(KUBELET_CSI_SOCKET)).unwrap();
    let socket = dir.join("csi.livedisk.io-reg.sock");
    assert_eq!(server.socket(), socket);
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut kubelet = client(&socket).await;
    let info = kubelet.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "csi.livedisk.io");
    assert_eq!(info.endpoint, KUBELET_CSI_SOCKET);
    assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);

    let registered = server.registered();
    assert!(!registered.get(), "not registered before kubelet says so");
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert!(registered.get());
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "driver name csi.livedisk.io already registered".into(),
        })
        .await
        .unwrap();
    assert!(!registered.get(), "a refusal clears the flag");

    drop(kubelet);
    server.stop().await.unwrap();
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket is removed on shutdown, so kubelet deregisters the driver"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
    let dir = temp_dir("registration-stale");
    let socket = dir.join("csi.livedisk.io-reg.sock");
    // A socket left by a killed process: bound, nobody listening any more.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(std::fs::symlink_metadata(&socket).is_ok());
    let server = RegistrationHandle::start(&dir, Path::new(KUBELET_CSI_SOCKET)).unwrap();
    let info = client(&socket)
        .await
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.livedisk.io");
    // Dropped without stop() (an early error exit): the socket still goes.
    drop(server);
    assert!(std::fs::symlink_metadata(&socket).is_err());

    std::fs::write(&socket, b"not a socket").unwrap();
    assert!(RegistrationHandle::start(&dir, Path::new(KUBELET_CSI_SOCKET)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
