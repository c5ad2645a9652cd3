//! A fake instance metadata service for one simulated instance, speaking IMDSv2: a session
//! token from `PUT /latest/api/token` (with the TTL header echoed, as the SDK requires), then
//! `GET`s that must carry it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cps_provider::InstanceIdentity;
use tiny_http::{Header, Method, Response, Server};

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

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
        let server = Arc::new(Server::http("127.0.0.1:0").map_err(io::Error::other)?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .unwrap_or_default();
        let stats = Arc::new(ImdsStats::default());
        let thread = {
            let (server, stats) = (server.clone(), stats.clone());
            std::thread::spawn(move || serve(&server, &identity, &stats))
        };
        Ok(Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            server,
            thread: Some(thread),
            stats,
        })
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

fn serve(server: &Server, identity: &InstanceIdentity, stats: &ImdsStats) {
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
                    match path {
                        "/latest/dynamic/instance-identity/document" => {
                            Response::from_string(document.clone())
                        }
                        "/latest/meta-data/instance-id" => {
                            Response::from_string(identity.instance_id.clone())
                        }
                        "/latest/meta-data/placement/availability-zone" => {
                            Response::from_string(identity.availability_zone.clone())
                        }
                        "/latest/meta-data/placement/region" => {
                            Response::from_string(identity.region.clone())
                        }
                        _ => Response::from_string("").with_status_code(404),
                    }
                }
            }
            _ => Response::from_string("").with_status_code(405),
        };
        let _ = req.respond(response);
    }
}
