//! A blocking facade over [`Client`] for code without an async runtime (a plain Python
//! extension, a synchronous data loader). It owns a small runtime and blocks on each call.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path as FsPath;

use bytes::Bytes;

use crate::client::{Client, FetchOptions, FetchReport, PushOptions, PushReport};
use crate::config::ClientConfig;
use crate::error::{ConnectError, FetchError, LocalFailure, PushError, RequestError};
use crate::proto::{DatasetName, Manifest, ObjectEntry, ObjectPath};
use crate::vocab::Path;

/// A [`Client`] with blocking methods.
#[derive(Debug)]
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    inner: Client,
}

impl BlockingClient {
    /// Connects (see [`Client::connect`]).
    pub fn connect(
        config: ClientConfig,
        addr: SocketAddr,
        path: Path,
    ) -> Result<Self, ConnectError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("transport-client")
            .enable_all()
            .build()
            .map_err(|e| ConnectError::Local(LocalFailure::Runtime(e)))?;
        let inner = rt.block_on(Client::connect(config, addr, path))?;
        Ok(Self { rt, inner })
    }

    /// The async client underneath.
    pub fn client(&self) -> &Client {
        &self.inner
    }

    /// See [`Client::list_datasets`].
    pub fn list_datasets(&self) -> Result<Vec<DatasetName>, RequestError> {
        self.rt.block_on(self.inner.list_datasets())
    }

    /// See [`Client::list_objects`].
    pub fn list_objects(
        &self,
        dataset: &DatasetName,
        prefix: &str,
    ) -> Result<Vec<ObjectEntry>, RequestError> {
        self.rt.block_on(self.inner.list_objects(dataset, prefix))
    }

    /// See [`Client::stat`].
    pub fn stat(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
    ) -> Result<Manifest, RequestError> {
        self.rt.block_on(self.inner.stat(dataset, object))
    }

    /// See [`Client::read_range`].
    pub fn read_range(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        self.rt
            .block_on(self.inner.read_range(dataset, object, range))
    }

    /// See [`Client::fetch`].
    pub fn fetch(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        limit: u64,
    ) -> Result<Bytes, FetchError> {
        self.rt.block_on(
            self.inner
                .fetch(dataset, object, limit, &FetchOptions::default()),
        )
    }

    /// See [`Client::fetch_to_file`].
    pub fn fetch_to_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        dest: &FsPath,
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        self.rt
            .block_on(self.inner.fetch_to_file(dataset, object, dest, opts))
    }

    /// See [`Client::push_bytes`].
    pub fn push_bytes(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        data: Bytes,
    ) -> Result<PushReport, PushError> {
        self.rt.block_on(
            self.inner
                .push_bytes(dataset, object, data, &PushOptions::default()),
        )
    }

    /// See [`Client::push_file`].
    pub fn push_file(
        &self,
        dataset: &DatasetName,
        object: &ObjectPath,
        src: &FsPath,
        opts: &PushOptions,
    ) -> Result<PushReport, PushError> {
        self.rt
            .block_on(self.inner.push_file(dataset, object, src, opts))
    }
}
