//! The node agent inside `transportd node`: attests the node to the issuer, keeps its node
//! SVID and the trust bundle current, mints SVIDs for the node's registration entries, and
//! serves them to local workloads over the SPIFFE Workload API.

pub(crate) mod view;
