//! Network interfaces in the in-memory cloud, with AWS's attach rules.

use async_trait::async_trait;
use tokio::time::Instant;

use super::{MemoryCloud, World};
use crate::{
    AttachmentState, Error, InstanceState, InterfaceAttachment, InterfaceService, NetworkInterface,
    Tags,
};

pub const DESCRIBE_NETWORK_INTERFACES: &str = "DescribeNetworkInterfaces";
pub const ATTACH_NETWORK_INTERFACE: &str = "AttachNetworkInterface";

pub(super) struct StoredInterface {
    eni: NetworkInterface,
    attached_at: Option<Instant>,
}

impl World {
    /// Adds an available interface with a fixed private IP; returns its id.
    pub fn add_interface(
        &mut self,
        availability_zone: &str,
        private_ip: &str,
        tags: &Tags,
    ) -> String {
        self.next_id += 1;
        let n = self.next_id;
        let id = format!("eni-{:017x}", 0x0e11_0000_0000u64 + n);
        let eni = NetworkInterface {
            id: id.clone(),
            availability_zone: availability_zone.to_owned(),
            subnet_id: format!("subnet-{availability_zone}"),
            mac: format!(
                "0e:00:00:{:02x}:{:02x}:{:02x}",
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ),
            private_ip: Some(private_ip.to_owned()),
            status: "available".into(),
            attachment: None,
            tags: tags.clone(),
        };
        self.interfaces.insert(
            id.clone(),
            StoredInterface {
                eni,
                attached_at: None,
            },
        );
        id
    }

    /// Attaches with AWS's rules (in use, zone, device index, instance state).
    pub fn attach_interface(
        &mut self,
        interface_id: &str,
        instance_id: &str,
        device_index: i32,
    ) -> Result<String, Error> {
        let instance = self
            .instances
            .get(instance_id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                operation: ATTACH_NETWORK_INTERFACE,
                resource: instance_id.to_owned(),
                message: format!("The instance ID '{instance_id}' does not exist"),
            })?;
        if instance.state != InstanceState::Running {
            return Err(Error::Api {
                operation: ATTACH_NETWORK_INTERFACE,
                code: Some("IncorrectInstanceState".into()),
                message: format!("The instance '{instance_id}' is not in the 'running' state."),
            });
        }
        let index_busy = self.interfaces.values().any(|s| {
            s.eni
                .attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance_id && a.device_index == device_index)
        });
        let attach_delay = self.timing.attach_delay;
        self.next_id += 1;
        let attachment_id = format!("eni-attach-{:017x}", self.next_id);
        let stored = self
            .interfaces
            .get_mut(interface_id)
            .ok_or_else(|| Error::NotFound {
                operation: ATTACH_NETWORK_INTERFACE,
                resource: interface_id.to_owned(),
                message: format!("The networkInterface ID '{interface_id}' does not exist"),
            })?;
        if stored.eni.attachment.is_some() {
            return Err(Error::InterfaceInUse {
                interface_id: interface_id.to_owned(),
                message: format!("Interface: [{interface_id}] in use."),
            });
        }
        if stored.eni.availability_zone != instance.availability_zone {
            return Err(Error::ZoneMismatch {
                resource: interface_id.to_owned(),
                instance_id: instance_id.to_owned(),
                message: "You may not attach a network interface to an instance if they are not in the same availability zone".into(),
            });
        }
        if index_busy {
            return Err(Error::DeviceIndexInUse {
                instance_id: instance_id.to_owned(),
                device_index,
                message: format!(
                    "Instance '{instance_id}' already has an interface attached at device index '{device_index}'."
                ),
            });
        }
        stored.eni.attachment = Some(InterfaceAttachment {
            attachment_id: attachment_id.clone(),
            instance_id: instance_id.to_owned(),
            device_index,
            state: AttachmentState::Attaching,
        });
        stored.eni.status = "in-use".into();
        stored.attached_at = Some(Instant::now() + attach_delay);
        Ok(attachment_id)
    }

    /// Secondary interfaces detach when their instance terminates.
    pub(super) fn release_interfaces_of(&mut self, instance_id: &str) {
        for stored in self.interfaces.values_mut() {
            if stored
                .eni
                .attachment
                .as_ref()
                .is_some_and(|a| a.instance_id == instance_id && a.device_index != 0)
            {
                stored.eni.attachment = None;
                stored.eni.status = "available".into();
                stored.attached_at = None;
            }
        }
    }

    /// All interfaces as they are now.
    pub fn interfaces(&self) -> Vec<NetworkInterface> {
        let now = Instant::now();
        self.interfaces
            .values()
            .map(|s| {
                let mut eni = s.eni.clone();
                if let (Some(a), Some(at)) = (eni.attachment.as_mut(), s.attached_at) {
                    a.state = if now >= at {
                        AttachmentState::Attached
                    } else {
                        AttachmentState::Attaching
                    };
                }
                eni
            })
            .collect()
    }
}

#[async_trait]
impl InterfaceService for MemoryCloud {
    async fn interfaces_tagged(&self, tags: &Tags) -> Result<Vec<NetworkInterface>, Error> {
        self.request(DESCRIBE_NETWORK_INTERFACES, |world| {
            Ok(world
                .interfaces()
                .into_iter()
                .filter(|e| tags.iter().all(|(k, v)| e.tags.get(k) == Some(v)))
                .collect())
        })
        .await
    }

    async fn interface(&self, interface_id: &str) -> Result<NetworkInterface, Error> {
        self.request(DESCRIBE_NETWORK_INTERFACES, |world| {
            world
                .interfaces()
                .into_iter()
                .find(|e| e.id == interface_id)
                .ok_or_else(|| Error::NotFound {
                    operation: DESCRIBE_NETWORK_INTERFACES,
                    resource: interface_id.to_owned(),
                    message: format!("The networkInterface ID '{interface_id}' does not exist"),
                })
        })
        .await
    }

    async fn attach_interface(
        &self,
        interface_id: &str,
        instance_id: &str,
        device_index: i32,
    ) -> Result<String, Error> {
        self.request(ATTACH_NETWORK_INTERFACE, |world| {
            world.attach_interface(interface_id, instance_id, device_index)
        })
        .await
    }
}
