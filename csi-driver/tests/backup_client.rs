//! The backup client (`livedisk-csi backup`) through the real binary, against
//! `stand_in_front`: a test-only HTTPS server that stands in for the node's export front (same
//! paths, statuses, headers, bearer token and CA-signed certificate), serving an image from a
//! temp file. The real front reads from the engine over NBD; what is tested here is the
//! client: full and incremental backups, restore of a chain, refusals, and resuming through
//! dropped connections and a restarted front.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use stand_in_front::{Export, Front};

const BIN: &str = env!("CARGO_BIN_EXE_livedisk-csi");
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 16 * MIB;
const TOKEN: &str = "t0ken-for-the-stand-in-front";
const SNAP1: &str = "snap-00000000-0000-4000-8000-000000000001";
const SNAP2: &str = "snap-00000000-0000-4000-8000-000000000002";
const SNAP3: &str = "snap-00000000-0000-4000-8000-000000000003";

mod stand_in_front {
    //! Stands in for the node's HTTPS export front (`export/http.rs` in the node plugin): `HEAD`
    //! and `GET` with one `Range` of `/exports/NAME`, `GET /exports/NAME/extents`, bearer
    //! tokens, text errors; plus the faults a test asks for.

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::os::unix::fs::FileExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame, Incoming};
    use hyper::header::{self, HeaderValue};
    use hyper::{Method, Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpSocket;
    use tokio::task::{JoinHandle, JoinSet};
    use tokio_rustls::TlsAcceptor;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::crypto::ring;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

    type Body = BoxBody<Bytes, std::io::Error>;

    /// What is served under `/exports/NAME` now.
    #[derive(Clone)]
    pub struct Export {
        pub name: String,
        pub image: PathBuf,
        /// The base snapshot and the extents changed since it, or none (then `/extents` is 404).
        pub changes: Option<(String, Vec<(u64, u64)>)>,
    }

    pub struct State {
        pub token: String,
        pub export: Mutex<Export>,
        /// Image bytes sent in answers to data requests (not counting the faults' half bodies).
        pub data_bytes: AtomicU64,
        pub data_requests: AtomicU64,
        /// TLS connections accepted (to see the client keep them alive).
        pub connections: AtomicU64,
        /// Data requests still to be dropped: the connection closes before the answer (odd
        /// counts) or halfway through its body (even counts).
        pub drops: AtomicU64,
        /// Delay before each data answer, so a test can act during a backup.
        pub delay_ms: AtomicU64,
    }

    pub struct Front {
        pub addr: SocketAddr,
        pub ca_pem: String,
        pub state: Arc<State>,
        tls: TlsAcceptor,
        server: Mutex<Option<JoinHandle<()>>>,
    }

    impl Front {
        /// A front on a free port of 127.0.0.1, with a new CA and a server certificate for
        /// 127.0.0.1 signed by it.
        pub async fn start(export: Export) -> Front {
            let ca_key = rcgen::KeyPair::generate().expect("CA key");
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "stand-in front CA");
            let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().expect("server key");
            let params =
                rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("server certificate");
            let mut config =
                ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .expect("TLS versions")
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![CertificateDer::from(cert.der().to_vec())],
                        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                    )
                    .expect("TLS config");
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let state = Arc::new(State {
                token: super::TOKEN.to_string(),
                export: Mutex::new(export),
                data_bytes: AtomicU64::new(0),
                data_requests: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                drops: AtomicU64::new(0),
                delay_ms: AtomicU64::new(0),
            });
            let listener = listen("127.0.0.1:0".parse().expect("address"));
            let addr = listener.local_addr().expect("address");
            let front = Front {
                addr,
                ca_pem: ca_cert.pem(),
                state,
                tls: TlsAcceptor::from(Arc::new(config)),
                server: Mutex::new(None),
            };
            front.serve(listener);
            front
        }

        pub fn url(&self) -> String {
            let name = self.state.export.lock().expect("lock").name.clone();
            format!("https://{}/exports/{name}", self.addr)
        }

        pub fn set_export(&self, export: Export) {
            *self.state.export.lock().expect("lock") = export;
        }

        /// Kills the front as a node plugin dies: the listener and every connection go at once.
        pub fn stop(&self) {
            if let Some(server) = self.server.lock().expect("lock").take() {
                server.abort();
            }
        }

        /// Starts it again on the same port, as the restarted node plugin does.
        pub fn restart(&self) {
            self.serve(listen(self.addr));
        }

        fn serve(&self, listener: tokio::net::TcpListener) {
            let (tls, state) = (self.tls.clone(), self.state.clone());
            let task = tokio::spawn(async move {
                // Owned by this task: aborting it drops the set, which aborts every connection.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    while connections.try_join_next().is_some() {}
                    let (tls, state) = (tls.clone(), state.clone());
                    connections.spawn(async move {
                        let Ok(stream) = tls.accept(tcp).await else {
                            return;
                        };
                        state.connections.fetch_add(1, Ordering::SeqCst);
                        let service = hyper::service::service_fn(move |request| {
                            answer(state.clone(), request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            *self.server.lock().expect("lock") = Some(task);
        }
    }

    fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(addr).expect("bind");
        socket.listen(64).expect("listen")
    }

    /// An `Err` makes hyper close the connection without an answer.
    async fn answer(
        state: Arc<State>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, std::io::Error> {
        let export = state.export.lock().expect("lock").clone();
        let authorized = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", state.token).as_str());
        if !authorized {
            return Ok(text(
                StatusCode::UNAUTHORIZED,
                "these credentials open no export on this node (wrong, withdrawn or expired)",
            ));
        }
        let path = request.uri().path();
        let Some(rest) = path.strip_prefix("/exports/") else {
            return Ok(text(
                StatusCode::NOT_FOUND,
                "no such path: exports are under /exports/NAME",
            ));
        };
        let (name, extents) = match rest.strip_suffix("/extents") {
            Some(name) => (name, true),
            None => (rest, false),
        };
        if name != export.name {
            return Ok(text(
                StatusCode::NOT_FOUND,
                &format!("no export {name:?} for these credentials"),
            ));
        }
        let image = std::fs::File::open(&export.image)?;
        let size = image.metadata()?.len();
        match (request.method(), extents) {
            (&Method::HEAD, false) => Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, size)
                .header(header::ACCEPT_RANGES, "bytes")
                .body(full(Bytes::new()))
                .expect("response")),
            (&Method::GET, true) => {
                let Some((base, changed)) = export.changes else {
                    return Ok(text(
                        StatusCode::NOT_FOUND,
                        "this export has no base snapshot, so no changed-extent map (set baseSnapshotName)",
                    ));
                };
                let body = serde_json::json!({
                    "snapshot": export.name,
                    "base": base,
                    "size": size,
                    "extents": changed.iter().map(|(o, l)| serde_json::json!({"offset": o, "length": l})).collect::<Vec<_>>(),
                });
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(Bytes::from(body.to_string())))
                    .expect("response"))
            }
            (&Method::GET, false) => {
                let range = request
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok());
                data(&state, &image, size, range).await
            }
            _ => Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served",
            )),
        }
    }

    async fn data(
        state: &State,
        image: &std::fs::File,
        size: u64,
        range: Option<&str>,
    ) -> Result<Response<Body>, std::io::Error> {
        let (start, end, status) = match range {
            None => (0, size, StatusCode::OK),
            Some(value) => {
                let Some((a, b)) = value
                    .strip_prefix("bytes=")
                    .filter(|spec| !spec.contains(','))
                    .and_then(|spec| spec.split_once('-'))
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                else {
                    return Ok(text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "one range per request, bytes=A-B",
                    ));
                };
                if a >= size || b < a {
                    return Ok(text(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "the range is outside the image",
                    ));
                }
                (a, (b + 1).min(size), StatusCode::PARTIAL_CONTENT)
            }
        };
        state.data_requests.fetch_add(1, Ordering::SeqCst);
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        image.read_exact_at(&mut buf, start)?;
        let drop_this = state
            .drops
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok();
        let mut response = Response::builder()
            .status(status)
            .header(header::CONTENT_LENGTH, end - start)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if status == StatusCode::PARTIAL_CONTENT {
            response = response.header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{size}", end - 1),
            );
        }
        let body = match drop_this {
            Some(n) if n % 2 == 1 => {
                return Err(std::io::Error::other(
                    "stand-in front: dropping the connection",
                ));
            }
            Some(_) => {
                let half = Bytes::from(buf).slice(..((end - start) / 2) as usize);
                let pieces: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                    Ok(Frame::data(half)),
                    Err(std::io::Error::other(
                        "stand-in front: dropping the connection mid-answer",
                    )),
                ];
                StreamBody::new(futures::stream::iter(pieces)).boxed()
            }
            None => {
                state.data_bytes.fetch_add(end - start, Ordering::SeqCst);
                full(Bytes::from(buf))
            }
        };
        Ok(response.body(body).expect("response"))
    }

    fn full(bytes: Bytes) -> Body {
        Full::new(bytes)
            .map_err(|never: Infallible| match never {})
            .boxed()
    }

    fn text(status: StatusCode, message: &str) -> Response<Body> {
        let mut response = Response::new(full(Bytes::from(format!("{message}\n"))));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// Deterministic bytes that are never zero for long (xorshift).
fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// 16 MiB: data in [0, 4 MiB) and [12, 16 MiB) except a hole at [13, 13.5 MiB); zeros between.
fn first_image() -> Vec<u8> {
    let mut image = vec![0u8; SIZE as usize];
    image[..4 * MIB as usize].copy_from_slice(&noise(4 * MIB, 1));
    image[12 * MIB as usize..].copy_from_slice(&noise(4 * MIB, 2));
    image[13 * MIB as usize..(13 * MIB + MIB / 2) as usize].fill(0);
    image
}

/// Writes `changes` (offset, bytes) into the image and returns the extent map they make.
fn change(image: &mut [u8], changes: &[(u64, Vec<u8>)]) -> Vec<(u64, u64)> {
    for (offset, bytes) in changes {
        image[*offset as usize..*offset as usize + bytes.len()].copy_from_slice(bytes);
    }
    changes.iter().map(|(o, b)| (*o, b.len() as u64)).collect()
}

/// The credentials directory, as the export's Secret is mounted: the token with a newline, and
/// a client certificate and key that the client does not use.
fn credentials(front: &Front, dir: &Path, token: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("credentials dir");
    std::fs::write(dir.join("ca-cert.pem"), &front.ca_pem).expect("ca");
    std::fs::write(dir.join("token"), format!("{token}\n")).expect("token");
    std::fs::write(dir.join("client-cert.pem"), "unused").expect("cert");
    std::fs::write(dir.join("client-key.pem"), "unused").expect("key");
    dir.to_path_buf()
}

async fn run(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .arg("backup")
        .args(args)
        .output()
        .await
        .expect("run livedisk-csi backup")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns the one JSON line of stdout.
fn summary(o: &Output, command: &str) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{command} failed: {}\n{out}", stderr(o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one summary line: {out}");
    let s: Value = serde_json::from_str(lines[0]).expect("summary JSON");
    assert_eq!(s["command"], command);
    assert!(s["seconds"].as_f64().is_some_and(|v| v >= 0.0), "{s}");
    s
}

fn manifest(backup: &Path) -> Value {
    let text = std::fs::read(format!("{}.backup.json", backup.display())).expect("manifest");
    serde_json::from_slice(&text).expect("manifest JSON")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn fetch_args<'a>(kind: &'a str, url: &'a str, creds: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        kind,
        "--url",
        url,
        "--credentials",
        path(creds),
        "--output",
        path(output),
        "--chunk-size",
        "1MiB",
    ]
}

fn total(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|(_, l)| l).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_two_incrementals_restore_the_final_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("served.img");
    let mut image = first_image();
    std::fs::write(&image_path, &image).expect("image");
    let front = Front::start(Export {
        name: SNAP1.into(),
        image: image_path.clone(),
        changes: None,
    })
    .await;
    let creds = credentials(&front, &dir.path().join("creds"), TOKEN);

    // Full: every byte read, zeros left as holes.
    let full = dir.path().join("full.img");
    let url = front.url();
    let o = run(&fetch_args("full", &url, &creds, &full)).await;
    let s = summary(&o, "backup full");
    assert_eq!(s["bytesRead"], SIZE);
    let nonzero = 7 * MIB + MIB / 2;
    assert_eq!(s["bytesWritten"], nonzero, "only the data is written");
    assert_eq!(std::fs::read(&full).expect("full"), image);
    // One connection for the HEAD and one per worker, kept alive for its 4 of the 16 ranges.
    let connections = front.state.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 5,
        "{connections} connections for 17 requests"
    );
    let allocated = std::fs::metadata(&full).expect("meta").blocks() * 512;
    assert!(
        allocated <= nonzero + MIB,
        "the backup is sparse: {allocated} bytes allocated"
    );
    let m = manifest(&full);
    assert_eq!(m["kind"], "full");
    assert_eq!(m["url"], url.as_str());
    assert_eq!(m["size"], SIZE);
    assert_eq!(m["bytesRead"], SIZE);
    assert_eq!(m["snapshot"], SNAP1);
    assert!(
        m["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{m}"
    );

    // An existing output is kept unless --force.
    let o = run(&fetch_args("full", &url, &creds, &full)).await;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("give --force"), "{}", stderr(&o));
    let mut forced = fetch_args("full", &url, &creds, &full);
    forced.push("--force");
    summary(&run(&forced).await, "backup full");
    assert_eq!(std::fs::read(&full).expect("full"), image);

    // First incremental: changed blocks, among them two touching extents, one longer than a
    // chunk, and one that turns data into zeros.
    let changes1 = change(
        &mut image,
        &[
            (0, noise(64 * KIB, 3)),
            (2 * MIB, noise(4 * KIB, 4)),
            (2 * MIB + 4 * KIB, noise(4 * KIB, 5)),
            (5 * MIB, noise(3 * MIB, 6)),
            (14 * MIB, vec![0; 64 * KIB as usize]),
        ],
    );
    std::fs::write(&image_path, &image).expect("image");
    front.set_export(Export {
        name: SNAP2.into(),
        image: image_path.clone(),
        changes: Some((SNAP1.into(), changes1.clone())),
    });
    let inc1 = dir.path().join("inc1.img");
    let before = front.state.data_bytes.load(Ordering::SeqCst);
    let o = run(&fetch_args("incremental", &front.url(), &creds, &inc1)).await;
    let s = summary(&o, "backup incremental");
    assert_eq!(
        s["bytesRead"],
        total(&changes1),
        "bytesRead is the extents' total"
    );
    let served = front.state.data_bytes.load(Ordering::SeqCst) - before;
    assert_eq!(
        served,
        total(&changes1),
        "the front sent no byte outside the extents"
    );
    let m = manifest(&inc1);
    assert_eq!(m["kind"], "incremental");
    assert_eq!(m["base"], SNAP1);
    assert_eq!(m["snapshot"], SNAP2);
    assert_eq!(m["size"], SIZE);
    assert_eq!(m["bytesRead"], total(&changes1));
    let listed: Vec<(u64, u64)> = m["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
            )
        })
        .collect();
    assert_eq!(listed, changes1);
    let inc1_bytes = std::fs::read(&inc1).expect("inc1");
    assert_eq!(inc1_bytes.len() as u64, SIZE);
    for (offset, length) in &changes1 {
        let (a, b) = (*offset as usize, (*offset + *length) as usize);
        assert_eq!(inc1_bytes[a..b], image[a..b], "extent at {offset}");
    }

    // Second incremental: an odd offset and length, and the image's last block.
    let changes2 = change(
        &mut image,
        &[
            (MIB + 1, noise(MIB, 7)),
            (9 * MIB, noise(MIB + 1, 8)),
            (SIZE - 4 * KIB, noise(4 * KIB, 9)),
        ],
    );
    std::fs::write(&image_path, &image).expect("image");
    front.set_export(Export {
        name: SNAP3.into(),
        image: image_path.clone(),
        changes: Some((SNAP2.into(), changes2.clone())),
    });
    let inc2 = dir.path().join("inc2.img");
    let before = front.state.data_bytes.load(Ordering::SeqCst);
    let o = run(&fetch_args("incremental", &front.url(), &creds, &inc2)).await;
    let s = summary(&o, "backup incremental");
    assert_eq!(s["bytesRead"], total(&changes2));
    assert_eq!(
        front.state.data_bytes.load(Ordering::SeqCst) - before,
        total(&changes2)
    );
    assert_eq!(manifest(&inc2)["base"], SNAP2);

    // Restore onto a used target (old bytes everywhere, and longer than the image).
    let target = dir.path().join("target.img");
    std::fs::write(&target, vec![0xAA; (SIZE + MIB) as usize]).expect("target");
    let o = run(&[
        "restore",
        "--full",
        path(&full),
        "--incremental",
        path(&inc1),
        "--incremental",
        path(&inc2),
        "--target",
        path(&target),
        "--chunk-size",
        "1MiB",
    ])
    .await;
    let s = summary(&o, "backup restore");
    let applied = SIZE + total(&changes1) + total(&changes2);
    assert_eq!(s["bytesRead"], applied);
    assert_eq!(
        s["bytesWritten"], applied,
        "zeros are written to a used target"
    );
    let restored = std::fs::read(&target).expect("target");
    assert!(
        restored[..SIZE as usize] == image[..],
        "the restored image equals the final one"
    );
    assert!(
        restored[SIZE as usize..].iter().all(|&b| b == 0xAA),
        "nothing past the image"
    );

    // Onto a zeroed target, zeros of the full backup are skipped.
    let zeroed = dir.path().join("zeroed.img");
    std::fs::File::create(&zeroed)
        .expect("zeroed")
        .set_len(SIZE)
        .expect("size");
    let o = run(&[
        "restore",
        "--full",
        path(&full),
        "--incremental",
        path(&inc1),
        "--incremental",
        path(&inc2),
        "--target",
        path(&zeroed),
        "--target-is-zeroed",
    ])
    .await;
    let s = summary(&o, "backup restore");
    assert!(
        s["bytesWritten"].as_u64().expect("written") < applied,
        "{s}"
    );
    assert!(
        std::fs::read(&zeroed).expect("zeroed") == image,
        "the zeroed restore equals the final image"
    );

    // A broken chain, a too small target and a full backup given as incremental are refused
    // before anything is written.
    let untouched = dir.path().join("untouched.img");
    std::fs::write(&untouched, vec![0x55; SIZE as usize]).expect("untouched");
    let o = run(&[
        "restore",
        "--full",
        path(&full),
        "--incremental",
        path(&inc2),
        "--target",
        path(&untouched),
    ])
    .await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("do not form a chain") && err.contains(SNAP2) && err.contains(SNAP1),
        "{err}"
    );
    let o = run(&[
        "restore",
        "--full",
        path(&full),
        "--incremental",
        path(&full),
        "--target",
        path(&untouched),
    ])
    .await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a full backup"), "{}", stderr(&o));
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0x55; (SIZE / 2) as usize]).expect("small");
    let o = run(&["restore", "--full", path(&full), "--target", path(&small)]).await;
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the backup needs 16777216"),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(&untouched)
            .expect("untouched")
            .iter()
            .all(|&b| b == 0x55)
    );
    assert!(
        std::fs::read(&small)
            .expect("small")
            .iter()
            .all(|&b| b == 0x55)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_fail_at_once_with_the_server_s_text() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("served.img");
    std::fs::write(&image_path, first_image()).expect("image");
    let front = Front::start(Export {
        name: SNAP1.into(),
        image: image_path,
        changes: None,
    })
    .await;
    let url = front.url();

    // A wrong token: 401, no retries, nothing created.
    let wrong = credentials(&front, &dir.path().join("wrong"), "not-the-token");
    let output = dir.path().join("full.img");
    let started = std::time::Instant::now();
    let o = run(&fetch_args("full", &url, &wrong, &output)).await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("401") && err.contains(&url) && err.contains("wrong, withdrawn or expired"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a refusal is not retried"
    );
    assert!(!output.exists());
    assert!(o.stdout.is_empty(), "no summary after an error");

    // An incremental of an export without a base: 404 with the front's reason.
    let creds = credentials(&front, &dir.path().join("creds"), TOKEN);
    let o = run(&fetch_args("incremental", &url, &creds, &output)).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{url}/extents")) && err.contains("no base snapshot"),
        "{err}"
    );

    // A CA that did not sign the front's certificate.
    let other = Front::start(Export {
        name: SNAP1.into(),
        image: dir.path().join("served.img"),
        changes: None,
    })
    .await;
    let foreign = credentials(&other, &dir.path().join("foreign"), TOKEN);
    let o = run(&fetch_args("full", &url, &foreign, &output)).await;
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
    assert!(!output.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_and_the_backup_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("served.img");
    let image = first_image();
    std::fs::write(&image_path, &image).expect("image");
    let front = Front::start(Export {
        name: SNAP1.into(),
        image: image_path,
        changes: None,
    })
    .await;
    let creds = credentials(&front, &dir.path().join("creds"), TOKEN);
    front.state.drops.store(6, Ordering::SeqCst);
    let output = dir.path().join("full.img");
    let o = run(&fetch_args("full", &front.url(), &creds, &output)).await;
    let s = summary(&o, "backup full");
    assert_eq!(
        front.state.drops.load(Ordering::SeqCst),
        0,
        "every fault was hit"
    );
    assert!(stderr(&o).contains("backup resumed"), "{}", stderr(&o));
    assert_eq!(s["bytesRead"], SIZE, "failed attempts are not counted");
    assert!(
        std::fs::read(&output).expect("backup") == image,
        "the backup equals the image"
    );
}

/// A full backup of the first image in 256 KiB ranges, running against a front that answers
/// each request after `delay_ms`.
struct SlowBackup {
    dir: tempfile::TempDir,
    front: Front,
    image: Vec<u8>,
    output: std::path::PathBuf,
    child: tokio::process::Child,
}

async fn slow_full_backup(delay_ms: u64) -> SlowBackup {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("served.img");
    let image = first_image();
    std::fs::write(&image_path, &image).expect("image");
    let front = Front::start(Export {
        name: SNAP1.into(),
        image: image_path,
        changes: None,
    })
    .await;
    let creds = credentials(&front, &dir.path().join("creds"), TOKEN);
    front.state.delay_ms.store(delay_ms, Ordering::SeqCst);
    let output = dir.path().join("full.img");
    let url = front.url();
    let mut args = fetch_args("full", &url, &creds, &output);
    args[8] = "256KiB";
    let child = tokio::process::Command::new(BIN)
        .arg("backup")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    SlowBackup {
        dir,
        front,
        image,
        output,
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_front_lets_the_backup_resume() {
    // 64 requests of 256 KiB, 4 at a time, 100 ms each: 1.6 s without the restart.
    let SlowBackup {
        dir: _dir,
        front,
        image,
        output,
        child,
    } = slow_full_backup(100).await;
    wait_for_requests(&front, 8).await;
    front.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    front.restart();
    let o = child.wait_with_output().await.expect("wait");
    let s = summary(&o, "backup full");
    let err = stderr(&o);
    assert!(
        err.contains("retrying for up to 120 s") && err.contains("backup resumed"),
        "{err}"
    );
    assert_eq!(s["bytesRead"], SIZE);
    assert!(
        std::fs::read(&output).expect("backup") == image,
        "the backup equals the image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_says_it_is_incomplete() {
    let SlowBackup {
        dir: _dir,
        front,
        image: _,
        output,
        child,
    } = slow_full_backup(200).await;
    wait_for_requests(&front, 4).await;
    let pid = child.id().expect("pid") as libc::pid_t;
    // SAFETY: kill(2) on the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let o = child.wait_with_output().await.expect("wait");
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("is incomplete"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    assert!(
        !PathBuf::from(format!("{}.backup.json", output.display())).exists(),
        "no manifest"
    );
}

async fn wait_for_requests(front: &Front, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while front.state.data_requests.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup made no requests"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_that_stays_down_fails_after_the_retry_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image_path = dir.path().join("served.img");
    std::fs::write(&image_path, first_image()).expect("image");
    let front = Front::start(Export {
        name: SNAP1.into(),
        image: image_path,
        changes: None,
    })
    .await;
    let creds = credentials(&front, &dir.path().join("creds"), TOKEN);
    front.stop();
    let output = dir.path().join("full.img");
    let url = front.url();
    let mut args = fetch_args("full", &url, &creds, &output);
    args.extend(["--retry-seconds", "2"]);
    let started = std::time::Instant::now();
    let o = run(&args).await;
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("HEAD failed for 2 s") && err.contains("Connection refused"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!output.exists());
}
