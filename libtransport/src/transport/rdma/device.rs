//! An open RDMA device: its context, protection domain and the port we use (`Drop` releases
//! them, protection domain first); and [`discover`], which lists the devices.

use std::sync::Arc;

use tracing::debug;

use super::sys::{self, Context, DeviceAttr, DeviceList, PortAttr, ProtectionDomain};
use super::verbs::VerbsError;
use super::{DeviceInfo, LinkLayer, PortInfo};

/// An open device with a protection domain, bound to one port.
pub(super) struct Device {
    /// Regions and queue pairs are created in it; it keeps the context open.
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) attr: DeviceAttr,
    pub(super) port: u8,
    pub(super) port_attr: PortAttr,
    pub(super) gid_index: u8,
    pub(super) gid: [u8; 16],
    pub(super) name: String,
}

impl Device {
    /// Opens the device called `name` (the first one if `None`) on `port`.
    pub(super) fn open(name: Option<&str>, port: u8, gid_index: u8) -> Result<Self, VerbsError> {
        let list = DeviceList::get().map_err(|source| VerbsError::Device {
            op: "listing RDMA devices (is the kernel's RDMA support loaded?)",
            source,
        })?;
        let index = (0..list.len())
            .find(|&i| name.is_none_or(|n| list.name(i).as_deref() == Some(n)))
            .ok_or_else(|| VerbsError::Device {
                op: "finding the RDMA device",
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    match name {
                        Some(n) => format!("no RDMA device named {n}"),
                        None => "no RDMA device on this machine".to_owned(),
                    },
                ),
            })?;
        let device_name = list.name(index).unwrap_or_default();
        let ctx = Arc::new(list.open(index).map_err(|source| VerbsError::Device {
            op: "opening the RDMA device",
            source,
        })?);
        let attr = ctx.query_device().map_err(|source| VerbsError::Device {
            op: "querying the RDMA device",
            source,
        })?;
        let port_attr = ctx.query_port(port).map_err(|source| VerbsError::Device {
            op: "querying the RDMA port",
            source,
        })?;
        if port_attr.state != sys::PORT_ACTIVE {
            return Err(VerbsError::Device {
                op: "using the RDMA port",
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("port {port} of {device_name} is not active"),
                ),
            });
        }
        let gid = ctx
            .query_gid(port, gid_index)
            .map_err(|source| VerbsError::Device {
                op: "querying the port's GID",
                source,
            })?;
        let pd = Arc::new(
            ProtectionDomain::alloc(&ctx).map_err(|source| VerbsError::Device {
                op: "allocating a protection domain",
                source,
            })?,
        );
        Ok(Self {
            pd,
            attr,
            port,
            port_attr,
            gid_index,
            gid,
            name: device_name,
        })
    }

    pub(super) fn context(&self) -> &Arc<Context> {
        self.pd.context()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The RDMA devices and their ports; empty where libibverbs finds none (or the kernel has
/// no RDMA support).
pub(super) fn discover() -> Vec<DeviceInfo> {
    let list = match DeviceList::get() {
        Ok(list) => list,
        Err(e) => {
            debug!(error = %e, "no RDMA devices");
            return Vec::new();
        }
    };
    (0..list.len())
        .filter_map(|i| {
            let name = list.name(i)?;
            let ports = match list.open(i) {
                Ok(ctx) => ports(&ctx),
                Err(e) => {
                    debug!(device = %name, error = %e, "cannot open RDMA device to list its ports");
                    Vec::new()
                }
            };
            Some(DeviceInfo {
                name,
                guid: list.guid(i).unwrap_or(0),
                ports,
            })
        })
        .collect()
}

fn ports(ctx: &Context) -> Vec<PortInfo> {
    let Ok(attr) = ctx.query_device() else {
        return Vec::new();
    };
    (1..=attr.phys_port_cnt)
        .filter_map(|port| {
            let p = ctx.query_port(port).ok()?;
            Some(PortInfo {
                port,
                active: p.state == sys::PORT_ACTIVE,
                link_layer: match p.link_layer {
                    sys::LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
                    sys::LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
                    _ => LinkLayer::Unknown,
                },
                active_mtu: mtu_bytes(p.active_mtu),
            })
        })
        .collect()
}

/// Bytes of an `ibv_mtu` value (1 = 256 ... 5 = 4096); 0 if unknown.
pub(super) fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}
