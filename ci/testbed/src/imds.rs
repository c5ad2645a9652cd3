//! A fake instance metadata service for one simulated instance, speaking IMDSv2: a session
//! token from `PUT /latest/api/token` (with the TTL header echoed, as the SDK requires), then
//! `GET`s that must carry it. It answers under `latest` and under any dated API version, with
//! directory listings, so cloud-init's EC2 data source can crawl it as on EC2 (the VM tier), and
//! serves the instance's user data when it has some. A guest's also serves an instance profile's
//! credentials (`iam/security-credentials/<role>`, the emulator's unrestricted key with a session
//! token), so the AWS SDK in the guest signs with them as on EC2.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cps_provider::InstanceIdentity;
use tiny_http::{Header, Method, Response, Server};

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The instance profile's role a guest's credentials come from.
pub const GUEST_ROLE: &str = "cps-bench-node";

/// Counts of what the fake was asked, for tests.
#[derive(Debug, Default)]
pub struct ImdsStats {
    pub tokens_issued: AtomicU64,
    pub gets: AtomicU64,
    pub rejected: AtomicU64,
}

pub struct FakeImds {
    endpoint: String,
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<ImdsStats>,
}

impl FakeImds {
    pub fn start(identity: InstanceIdentity) -> io::Result<Self> {
        let tree = metadata_tree(&identity, None);
        Self::spawn(identity, None, tree)
    }

    /// As [`FakeImds::start`], for a guest: with its user data, its interface's MAC, and the
    /// credentials of an instance profile ([`GUEST_ROLE`]). (Only a guest's: the host tier's
    /// binaries read the same endpoint, and one test proves a boot without credentials fails.)
    pub fn start_with(
        identity: InstanceIdentity,
        user_data: Option<Vec<u8>>,
        mac: Option<String>,
    ) -> io::Result<Self> {
        let mut tree = metadata_tree(&identity, mac.as_deref());
        tree.extend(instance_profile(&identity));
        Self::spawn(identity, user_data, tree)
    }

    fn spawn(
        identity: InstanceIdentity,
        user_data: Option<Vec<u8>>,
        tree: BTreeMap<String, String>,
    ) -> io::Result<Self> {
        let server = Arc::new(Server::http("127.0.0.1:0").map_err(io::Error::other)?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .unwrap_or_default();
        let stats = Arc::new(ImdsStats::default());
        let thread = {
            let (server, stats) = (server.clone(), stats.clone());
            std::thread::spawn(move || serve(&server, &identity, &tree, user_data, &stats))
        };
        Ok(Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            server,
            thread: Some(thread),
            stats,
        })
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_default()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn stats(&self) -> &ImdsStats {
        &self.stats
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_owned())
}

/// The `meta-data/` leaves, by path.
fn metadata_tree(identity: &InstanceIdentity, mac: Option<&str>) -> BTreeMap<String, String> {
    let ip = "169.254.0.15";
    let host = "ip-169-254-0-15.ec2.internal";
    let mut t: BTreeMap<String, String> = [
        ("ami-id", "ami-cpsbench"),
        ("instance-id", identity.instance_id.as_str()),
        ("instance-type", "m6i.large"),
        ("hostname", host),
        ("local-hostname", host),
        ("local-ipv4", ip),
        (
            "placement/availability-zone",
            identity.availability_zone.as_str(),
        ),
        ("placement/region", identity.region.as_str()),
        ("services/domain", "amazonaws.com"),
        ("services/partition", "aws"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if let Some(mac) = mac {
        t.insert("mac".into(), mac.into());
        let nic = format!("network/interfaces/macs/{mac}");
        t.insert(format!("{nic}/device-number"), "0".into());
        t.insert(format!("{nic}/mac"), mac.into());
        t.insert(format!("{nic}/local-ipv4s"), ip.into());
    }
    t
}

/// The `iam/` leaves of a guest's metadata: the profile and its role's credentials, valid for six
/// hours (the SDK refreshes credentials near their expiry; a test ends long before).
fn instance_profile(identity: &InstanceIdentity) -> BTreeMap<String, String> {
    use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
    let at = |from_now: u64| {
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(from_now);
        DateTime::from(t)
            .fmt(DateTimeFormat::DateTime)
            .expect("a time of this century formats")
    };
    let arn = format!("arn:aws:iam::123456789012:instance-profile/{GUEST_ROLE}");
    let credentials = serde_json::json!({
        "Code": "Success",
        "LastUpdated": at(0),
        "Type": "AWS-HMAC",
        "AccessKeyId": "testing",
        "SecretAccessKey": "testing",
        "Token": format!("cps-bench-session-{}", identity.instance_id),
        "Expiration": at(6 * 3600),
    });
    let info = serde_json::json!({
        "Code": "Success",
        "LastUpdated": at(0),
        "InstanceProfileArn": arn,
        "InstanceProfileId": "AIPACPSBENCH",
    });
    BTreeMap::from([
        ("iam/info".to_owned(), info.to_string()),
        (
            format!("iam/security-credentials/{GUEST_ROLE}"),
            credentials.to_string(),
        ),
    ])
}

/// A leaf's value, or a directory's listing (children one per line, directories with a `/`).
fn lookup(tree: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let path = path.trim_end_matches('/');
    if let Some(v) = tree.get(path) {
        return Some(v.clone());
    }
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    let mut children: Vec<String> = tree
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix))
        .map(|rest| match rest.split_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => rest.to_owned(),
        })
        .collect();
    children.dedup();
    (!children.is_empty()).then(|| children.join("\n"))
}

/// `/latest/x` or `/2021-03-23/x` → `x`; anything else is not an API path.
fn strip_version(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let dated = version.len() == 10
        && version.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    (version == "latest" || dated).then_some(rest)
}

fn serve(
    server: &Server,
    identity: &InstanceIdentity,
    tree: &BTreeMap<String, String>,
    user_data: Option<Vec<u8>>,
    stats: &ImdsStats,
) {
    let tokens: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let document = serde_json::json!({
        "instanceId": identity.instance_id,
        "region": identity.region,
        "availabilityZone": identity.availability_zone,
        "instanceType": "m6i.large",
        "imageId": "ami-cpsbench",
        "architecture": "x86_64",
    })
    .to_string();
    // Ends when Drop unblocks the server.
    for req in server.incoming_requests() {
        let url = req.url().to_owned();
        let response = match (req.method(), url.as_str()) {
            (Method::Put, "/latest/api/token") => match header(&req, TTL_HEADER)
                .and_then(|t| t.parse::<u32>().ok())
            {
                Some(ttl) if (1..=21_600).contains(&ttl) => {
                    let n = stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
                    let token = format!("cps-bench-token-{}-{n}", identity.instance_id);
                    tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(token.clone());
                    Response::from_string(token).with_header(
                        Header::from_bytes(TTL_HEADER, ttl.to_string()).expect("valid header"),
                    )
                }
                _ => Response::from_string("missing or invalid TTL header").with_status_code(400),
            },
            (Method::Get, path) => {
                let token_ok = header(&req, TOKEN_HEADER).is_some_and(|t| {
                    tokens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&t)
                });
                if !token_ok {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    Response::from_string("").with_status_code(401)
                } else {
                    stats.gets.fetch_add(1, Ordering::Relaxed);
                    let found = match strip_version(path) {
                        Some("dynamic/instance-identity/document") => Some(document.clone()),
                        Some("dynamic/instance-identity" | "dynamic/instance-identity/") => {
                            Some("document".into())
                        }
                        Some("user-data") => user_data
                            .as_ref()
                            .map(|u| String::from_utf8_lossy(u).into_owned()),
                        Some(rest) => rest
                            .strip_prefix("meta-data")
                            .and_then(|p| lookup(tree, p.trim_start_matches('/'))),
                        None => None,
                    };
                    match found {
                        Some(body) => Response::from_string(body),
                        None => Response::from_string("").with_status_code(404),
                    }
                }
            }
            _ => Response::from_string("").with_status_code(405),
        };
        let _ = req.respond(response);
    }
}
