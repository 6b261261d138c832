//! The node plugin's kubelet registration server, called as kubelet's plugin watcher calls it:
//! GetInfo then NotifyRegistrationStatus, over the unix socket in the registry directory.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use livedisk_csi::node::registration::RegistrationHandle;
use livedisk_csi_proto::pluginregistration::registration_client::RegistrationClient;
use livedisk_csi_proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus};
use loona_hpack::{Decoder, Encoder};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// GetInfo as kubelet v1.36 sends it: grpc-go dialled the bare socket path, so the `:authority`
/// is that path, escaped. h2 alone resets such a stream (PROTOCOL_ERROR); the answer must come.
/// Written at the HTTP/2 frame level because Rust clients cannot send that authority.
async fn get_info_with_kubelets_authority(socket: &Path) -> Result<PluginInfo, String> {
    let mut conn = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut encoder = Encoder::new();
    let authority = socket.display().to_string().replace('/', "%2F");
    let headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/pluginregistration.Registration/GetInfo"),
        (":authority", authority.as_str()),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let block = encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA, END_STREAM: empty InfoRequest
    conn.write_all(&out).await.unwrap();

    let mut decoder = Decoder::new();
    let mut message = Vec::new();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .await
            .map_err(|e| e.to_string())?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload)
            .await
            .map_err(|e| e.to_string())?;
        match kind {
            0x4 if flags & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
            0x3 => return Err(format!("RST_STREAM, error code {payload:?}")),
            0x7 => return Err(format!("GOAWAY {payload:?}")),
            0x0 => message.extend(payload),
            0x1 => {
                let fields = decoder.decode(&payload).map_err(|e| format!("{e:?}"))?;
                if flags & 0x1 != 0 {
                    let status = fields
                        .iter()
                        .find(|(n, _)| n == b"grpc-status")
                        .map(|(_, v)| String::from_utf8_lossy(v).to_string());
                    if status.as_deref() != Some("0") {
                        return Err(format!("grpc-status {status:?}: {fields:?}"));
                    }
                    return PluginInfo::decode(&message[5..]).map_err(|e| e.to_string());
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn kubelets_escaped_socket_path_authority_is_answered() {
    let dir = temp_dir("registration-authority");
    let server = RegistrationHandle::start(&dir, Path::new(KUBELET_CSI_SOCKET)).unwrap();
    // Two calls, two connections, as kubelet dials anew for each.
    for _ in 0..2 {
        let info = get_info_with_kubelets_authority(server.socket())
            .await
            .unwrap();
        assert_eq!(info.name, "csi.livedisk.io");
        assert_eq!(info.endpoint, KUBELET_CSI_SOCKET);
    }
    server.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
