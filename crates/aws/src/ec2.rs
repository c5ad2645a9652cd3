//! [`VolumeService`], [`InterfaceService`] and [`TemplateService`] on the EC2 API.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification, VolumeType};
use cps_provider::{
    Attachment, AttachmentState, CallLog, Error, InstanceState, InterfaceAttachment,
    InterfaceService, Modification, ModificationState, NetworkInterface, Snapshot, SnapshotState,
    Tags, TemplateService, TemplateVersions, Volume, VolumeChange, VolumeService, VolumeSpec,
    VolumeState,
};

use crate::classify::{Context, classify};
use crate::pages::paginate;

/// EBS volumes, instances and network interfaces through an EC2 client. Counts every request it sends (pages included).
#[derive(Clone, Debug)]
pub struct Ec2Api {
    client: aws_sdk_ec2::Client,
    calls: Arc<CallLog>,
    page_size: i32,
}

impl Ec2Api {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_client(aws_sdk_ec2::Client::new(config))
    }

    pub fn from_client(client: aws_sdk_ec2::Client) -> Self {
        Self {
            client,
            calls: Arc::new(CallLog::default()),
            page_size: Self::PAGE_SIZE,
        }
    }

    /// DescribeVolumes page size (clamped to the 5–500 AWS accepts).
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = page_size.clamp(5, 500);
        self
    }

    pub fn calls(&self) -> &CallLog {
        &self.calls
    }

    /// The default DescribeVolumes page size: the most AWS allows.
    pub const PAGE_SIZE: i32 = 500;
}

fn to_volume(v: &aws_sdk_ec2::types::Volume) -> Volume {
    Volume {
        id: v.volume_id().unwrap_or_default().to_owned(),
        availability_zone: v.availability_zone().unwrap_or_default().to_owned(),
        size_gib: v.size().unwrap_or_default(),
        volume_type: v
            .volume_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        iops: v.iops(),
        throughput: v.throughput(),
        encrypted: v.encrypted().unwrap_or_default(),
        state: VolumeState::parse(v.state().map(|s| s.as_str()).unwrap_or("unknown")),
        attachments: v
            .attachments()
            .iter()
            .map(|a| Attachment {
                instance_id: a.instance_id().unwrap_or_default().to_owned(),
                device: a.device().unwrap_or_default().to_owned(),
                state: AttachmentState::parse(a.state().map(|s| s.as_str()).unwrap_or("unknown")),
                delete_on_termination: a.delete_on_termination().unwrap_or(false),
            })
            .collect(),
        tags: to_tags(v.tags()),
        snapshot_id: non_empty(v.snapshot_id()),
    }
}

fn to_tags(tags: &[Tag]) -> Tags {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// EC2 reports "no snapshot" as an empty `SnapshotId`.
fn non_empty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_owned)
}

/// A snapshot as DescribeSnapshots (or CreateSnapshot, whose reply has the same fields)
/// reports it. A state this code does not know (`recoverable`…) is not taken for completed.
struct SnapshotReply<'a> {
    id: Option<&'a str>,
    volume_id: Option<&'a str>,
    state: Option<&'a aws_sdk_ec2::types::SnapshotState>,
    progress: Option<&'a str>,
    start_time: Option<&'a aws_sdk_ec2::primitives::DateTime>,
    size: Option<i32>,
    encrypted: Option<bool>,
    tags: &'a [Tag],
}

impl SnapshotReply<'_> {
    fn parse(&self) -> Snapshot {
        let state = self.state.map(|s| s.as_str()).unwrap_or("");
        Snapshot {
            id: self.id.unwrap_or_default().to_owned(),
            volume_id: self.volume_id.unwrap_or_default().to_owned(),
            state: SnapshotState::parse(state).unwrap_or(SnapshotState::Pending),
            // "42%"
            progress_percent: self
                .progress
                .and_then(|p| p.trim().trim_end_matches('%').parse().ok()),
            started: self
                .start_time
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            size_gib: self.size.unwrap_or_default(),
            encrypted: self.encrypted.unwrap_or_default(),
            tags: to_tags(self.tags),
        }
    }
}

fn to_snapshot(s: &aws_sdk_ec2::types::Snapshot) -> Snapshot {
    SnapshotReply {
        id: s.snapshot_id(),
        volume_id: s.volume_id(),
        state: s.state(),
        progress: s.progress(),
        start_time: s.start_time(),
        size: s.volume_size(),
        encrypted: s.encrypted(),
        tags: s.tags(),
    }
    .parse()
}

/// A modification as EC2 reports it. AWS fills in every target (also those the request left
/// alone); should a reply lack one, the original value stands in, as nothing changed it.
fn to_modification(m: &aws_sdk_ec2::types::VolumeModification) -> Modification {
    let state = m.modification_state().map(|s| s.as_str()).unwrap_or("");
    Modification {
        volume_id: m.volume_id().unwrap_or_default().to_owned(),
        // A state this code does not know is not taken for done: "modifying" waits for it.
        state: ModificationState::parse(state).unwrap_or(ModificationState::Modifying),
        target_size_gib: m.target_size().or(m.original_size()).unwrap_or_default(),
        target_volume_type: m
            .target_volume_type()
            .or(m.original_volume_type())
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        target_iops: m.target_iops().or(m.original_iops()),
        target_throughput: m.target_throughput().or(m.original_throughput()),
        original_size_gib: m.original_size().unwrap_or_default(),
        progress_percent: m.progress(),
        started: m
            .start_time()
            .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        status_message: m.status_message().map(str::to_owned),
    }
}

#[async_trait]
impl VolumeService for Ec2Api {
    async fn volumes_tagged(&self, tags: &Tags) -> Result<Vec<Volume>, Error> {
        let filters: Vec<Filter> = tags
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        // Bounded: 10,000 pages of 500 is far beyond any account's volume quota.
        paginate(&self.calls, "DescribeVolumes", 10_000, |token| {
            let request = self
                .client
                .describe_volumes()
                .set_filters(Some(filters.clone()))
                .max_results(self.page_size)
                .set_next_token(token);
            async move {
                let page = request
                    .send()
                    .await
                    .map_err(|e| classify("DescribeVolumes", Context::default(), e))?;
                Ok((
                    page.volumes().iter().map(to_volume).collect(),
                    page.next_token().map(str::to_owned),
                ))
            }
        })
        .await
    }

    async fn volume(&self, volume_id: &str) -> Result<Volume, Error> {
        self.calls.record("DescribeVolumes");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        let out = self
            .client
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
            .map_err(|e| classify("DescribeVolumes", ctx, e))?;
        out.volumes()
            .iter()
            .find(|v| v.volume_id() == Some(volume_id))
            .map(to_volume)
            .ok_or_else(|| Error::NotFound {
                operation: "DescribeVolumes",
                resource: volume_id.to_owned(),
                message: "not in the DescribeVolumes response".into(),
            })
    }

    async fn create_volume(&self, spec: &VolumeSpec, client_token: &str) -> Result<Volume, Error> {
        self.calls.record("CreateVolume");
        let tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .client
            .create_volume()
            .availability_zone(&spec.availability_zone)
            .size(spec.size_gib)
            .volume_type(VolumeType::from(spec.volume_type.as_str()))
            .set_iops(spec.iops)
            .set_throughput(spec.throughput)
            .encrypted(spec.encrypted)
            .set_kms_key_id(spec.kms_key_id.clone())
            .set_snapshot_id(spec.snapshot_id.clone())
            .set_volume_initialization_rate(spec.initialization_rate)
            .client_token(client_token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                classify(
                    "CreateVolume",
                    Context {
                        client_token: Some(client_token),
                        snapshot_id: spec.snapshot_id.as_deref(),
                        ..Context::default()
                    },
                    e,
                )
            })?;
        Ok(Volume {
            id: out.volume_id().unwrap_or_default().to_owned(),
            availability_zone: out.availability_zone().unwrap_or_default().to_owned(),
            size_gib: out.size().unwrap_or_default(),
            volume_type: out
                .volume_type()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            iops: out.iops(),
            throughput: out.throughput(),
            encrypted: out.encrypted().unwrap_or_default(),
            state: VolumeState::parse(out.state().map(|s| s.as_str()).unwrap_or("creating")),
            attachments: Vec::new(),
            tags: to_tags(out.tags()),
            snapshot_id: non_empty(out.snapshot_id()),
        })
    }

    async fn tag_volume(&self, volume_id: &str, tags: &Tags) -> Result<(), Error> {
        self.calls.record("CreateTags");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        self.client
            .create_tags()
            .resources(volume_id)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| classify("CreateTags", ctx, e))?;
        Ok(())
    }

    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<AttachmentState, Error> {
        self.calls.record("AttachVolume");
        let ctx = Context {
            volume_id: Some(volume_id),
            instance_id: Some(instance_id),
            device: Some(device),
            ..Context::default()
        };
        let out = self
            .client
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .device(device)
            .send()
            .await
            .map_err(|e| classify("AttachVolume", ctx, e))?;
        Ok(AttachmentState::parse(
            out.state().map(|s| s.as_str()).unwrap_or("attaching"),
        ))
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        change: &VolumeChange,
    ) -> Result<Modification, Error> {
        self.calls.record("ModifyVolume");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        let out = self
            .client
            .modify_volume()
            .volume_id(volume_id)
            .set_size(change.size_gib)
            .set_volume_type(change.volume_type.as_deref().map(VolumeType::from))
            .set_iops(change.iops)
            .set_throughput(change.throughput)
            .send()
            .await
            .map_err(|e| classify("ModifyVolume", ctx, e))?;
        out.volume_modification()
            .map(to_modification)
            .ok_or_else(|| Error::Api {
                operation: "ModifyVolume",
                code: None,
                message: format!("the reply for {volume_id} holds no modification"),
            })
    }

    async fn latest_modification(&self, volume_id: &str) -> Result<Option<Modification>, Error> {
        self.calls.record("DescribeVolumesModifications");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        let out = match self
            .client
            .describe_volumes_modifications()
            .volume_ids(volume_id)
            .send()
            .await
        {
            Ok(out) => out,
            // AWS's answer for a volume that was never modified.
            Err(e) if e.code() == Some("InvalidVolumeModification.NotFound") => return Ok(None),
            Err(e) => return Err(classify("DescribeVolumesModifications", ctx, e)),
        };
        // AWS reports the most recent one per volume; should there be more, the newest wins.
        Ok(out
            .volumes_modifications()
            .iter()
            .filter(|m| m.volume_id() == Some(volume_id))
            .max_by_key(|m| m.start_time().map(|t| (t.secs(), t.subsec_nanos())))
            .map(to_modification))
    }

    async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<Snapshot, Error> {
        self.calls.record("CreateSnapshot");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .client
            .create_snapshot()
            .volume_id(volume_id)
            .description(description)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("CreateSnapshot", ctx, e))?;
        Ok(SnapshotReply {
            id: out.snapshot_id(),
            volume_id: out.volume_id(),
            state: out.state(),
            progress: out.progress(),
            start_time: out.start_time(),
            size: out.volume_size(),
            encrypted: out.encrypted(),
            tags: out.tags(),
        }
        .parse())
    }

    async fn snapshot(&self, snapshot_id: &str) -> Result<Snapshot, Error> {
        self.calls.record("DescribeSnapshots");
        let ctx = Context {
            snapshot_id: Some(snapshot_id),
            ..Context::default()
        };
        let out = self
            .client
            .describe_snapshots()
            .snapshot_ids(snapshot_id)
            .send()
            .await
            .map_err(|e| classify("DescribeSnapshots", ctx, e))?;
        out.snapshots()
            .iter()
            .find(|s| s.snapshot_id() == Some(snapshot_id))
            .map(to_snapshot)
            .ok_or_else(|| Error::NotFound {
                operation: "DescribeSnapshots",
                resource: snapshot_id.to_owned(),
                message: "not in the DescribeSnapshots response".into(),
            })
    }

    async fn snapshots_tagged(&self, tags: &Tags) -> Result<Vec<Snapshot>, Error> {
        let filters: Vec<Filter> = tags
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        // Bounded like DescribeVolumes: 1,000 pages of 1,000 is past any account's quota.
        paginate(&self.calls, "DescribeSnapshots", 1_000, |token| {
            let request = self
                .client
                .describe_snapshots()
                .owner_ids("self")
                .set_filters(Some(filters.clone()))
                .max_results(1_000)
                .set_next_token(token);
            async move {
                let page = request
                    .send()
                    .await
                    .map_err(|e| classify("DescribeSnapshots", Context::default(), e))?;
                Ok((
                    page.snapshots().iter().map(to_snapshot).collect(),
                    page.next_token().map(str::to_owned),
                ))
            }
        })
        .await
    }

    async fn untag_volume(&self, volume_id: &str, keys: &[String]) -> Result<(), Error> {
        // DeleteTags without tags would remove every tag of the volume.
        if keys.is_empty() {
            return Ok(());
        }
        self.calls.record("DeleteTags");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        self.client
            .delete_tags()
            .resources(volume_id)
            .set_tags(Some(
                keys.iter().map(|k| Tag::builder().key(k).build()).collect(),
            ))
            .send()
            .await
            .map_err(|e| classify("DeleteTags", ctx, e))?;
        Ok(())
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), Error> {
        self.calls.record("DeleteVolume");
        let ctx = Context {
            volume_id: Some(volume_id),
            ..Context::default()
        };
        self.client
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
            .map_err(|e| classify("DeleteVolume", ctx, e))?;
        Ok(())
    }

    async fn instance_tags(&self, instance_id: &str) -> Result<Tags, Error> {
        let filter = Filter::builder()
            .name("resource-id")
            .values(instance_id)
            .build();
        let pairs = paginate(&self.calls, "DescribeTags", 100, |token| {
            let request = self
                .client
                .describe_tags()
                .filters(filter.clone())
                .set_next_token(token);
            async move {
                let page = request.send().await.map_err(|e| {
                    classify(
                        "DescribeTags",
                        Context {
                            instance_id: Some(instance_id),
                            ..Context::default()
                        },
                        e,
                    )
                })?;
                let pairs: Vec<(String, String)> = page
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect();
                Ok((pairs, page.next_token().map(str::to_owned)))
            }
        })
        .await?;
        Ok(pairs.into_iter().collect())
    }

    async fn instance_states(
        &self,
        instance_ids: &[String],
    ) -> Result<BTreeMap<String, InstanceState>, Error> {
        // A filter, not InstanceIds: an id EC2 has already forgotten must not fail the call.
        let mut states: BTreeMap<String, InstanceState> = instance_ids
            .iter()
            .map(|id| (id.clone(), InstanceState::Terminated))
            .collect();
        if instance_ids.is_empty() {
            return Ok(states);
        }
        let filter = Filter::builder()
            .name("instance-id")
            .set_values(Some(instance_ids.to_vec()))
            .build();
        let seen = paginate(&self.calls, "DescribeInstances", 100, |token| {
            let request = self
                .client
                .describe_instances()
                .filters(filter.clone())
                .set_next_token(token);
            async move {
                let page = request
                    .send()
                    .await
                    .map_err(|e| classify("DescribeInstances", Context::default(), e))?;
                let seen: Vec<(String, InstanceState)> = page
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(|i| {
                        Some((
                            i.instance_id()?.to_owned(),
                            InstanceState::parse(i.state()?.name()?.as_str()),
                        ))
                    })
                    .collect();
                Ok((seen, page.next_token().map(str::to_owned)))
            }
        })
        .await?;
        states.extend(seen);
        Ok(states)
    }
}

fn to_interface(e: &aws_sdk_ec2::types::NetworkInterface) -> NetworkInterface {
    NetworkInterface {
        id: e.network_interface_id().unwrap_or_default().to_owned(),
        availability_zone: e.availability_zone().unwrap_or_default().to_owned(),
        subnet_id: e.subnet_id().unwrap_or_default().to_owned(),
        mac: e.mac_address().unwrap_or_default().to_ascii_lowercase(),
        private_ip: e.private_ip_address().map(str::to_owned),
        status: e
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        // An attachment without an instance id (another account's service) still holds it.
        attachment: e.attachment().map(|a| InterfaceAttachment {
            attachment_id: a.attachment_id().unwrap_or_default().to_owned(),
            instance_id: a
                .instance_id()
                .unwrap_or("an instance cps cannot see")
                .to_owned(),
            device_index: a.device_index().unwrap_or_default(),
            state: AttachmentState::parse(a.status().map(|s| s.as_str()).unwrap_or("attached")),
        }),
        tags: e
            .tag_set()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    }
}

#[async_trait]
impl InterfaceService for Ec2Api {
    async fn interfaces_tagged(&self, tags: &Tags) -> Result<Vec<NetworkInterface>, Error> {
        let filters: Vec<Filter> = tags
            .iter()
            .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
            .collect();
        paginate(&self.calls, "DescribeNetworkInterfaces", 1_000, |token| {
            let request = self
                .client
                .describe_network_interfaces()
                .set_filters(Some(filters.clone()))
                .set_next_token(token);
            async move {
                let page = request
                    .send()
                    .await
                    .map_err(|e| classify("DescribeNetworkInterfaces", Context::default(), e))?;
                Ok((
                    page.network_interfaces().iter().map(to_interface).collect(),
                    page.next_token().map(str::to_owned),
                ))
            }
        })
        .await
    }

    async fn interface(&self, interface_id: &str) -> Result<NetworkInterface, Error> {
        self.calls.record("DescribeNetworkInterfaces");
        let ctx = Context {
            interface_id: Some(interface_id),
            ..Context::default()
        };
        let out = self
            .client
            .describe_network_interfaces()
            .network_interface_ids(interface_id)
            .send()
            .await
            .map_err(|e| classify("DescribeNetworkInterfaces", ctx, e))?;
        out.network_interfaces()
            .iter()
            .find(|e| e.network_interface_id() == Some(interface_id))
            .map(to_interface)
            .ok_or_else(|| Error::NotFound {
                operation: "DescribeNetworkInterfaces",
                resource: interface_id.to_owned(),
                message: "not in the DescribeNetworkInterfaces response".into(),
            })
    }

    async fn attach_interface(
        &self,
        interface_id: &str,
        instance_id: &str,
        device_index: i32,
    ) -> Result<String, Error> {
        self.calls.record("AttachNetworkInterface");
        let ctx = Context {
            interface_id: Some(interface_id),
            instance_id: Some(instance_id),
            device_index: Some(device_index),
            ..Context::default()
        };
        let out = self
            .client
            .attach_network_interface()
            .network_interface_id(interface_id)
            .instance_id(instance_id)
            .device_index(device_index)
            .send()
            .await
            .map_err(|e| classify("AttachNetworkInterface", ctx, e))?;
        Ok(out.attachment_id().unwrap_or_default().to_owned())
    }
}

#[async_trait]
impl TemplateService for Ec2Api {
    async fn template_versions(&self, ids: &[String]) -> Result<Vec<TemplateVersions>, Error> {
        let mut found = Vec::new();
        // DescribeLaunchTemplates takes up to 200 ids; 100 per request keeps the URL modest.
        for batch in ids.chunks(100) {
            let page = paginate(&self.calls, "DescribeLaunchTemplates", 100, |token| {
                let request = self
                    .client
                    .describe_launch_templates()
                    .set_launch_template_ids(Some(batch.to_vec()))
                    .set_next_token(token);
                async move {
                    let page = request
                        .send()
                        .await
                        .map_err(|e| classify("DescribeLaunchTemplates", Context::default(), e))?;
                    let versions: Vec<TemplateVersions> = page
                        .launch_templates()
                        .iter()
                        .filter_map(|t| {
                            Some(TemplateVersions {
                                id: t.launch_template_id()?.to_owned(),
                                default_version: t.default_version_number()?,
                                latest_version: t.latest_version_number()?,
                            })
                        })
                        .collect();
                    Ok((versions, page.next_token().map(str::to_owned)))
                }
            })
            .await?;
            found.extend(page);
        }
        Ok(found)
    }
}
