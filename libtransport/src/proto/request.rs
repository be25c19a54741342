//! The client's side of one request stream, without I/O: which response each request takes,
//! and the listing of a dataset's objects, page by page.
//!
//! A request stream carries one request and, for most requests, one response (`Data`
//! frames and `End` for reads, see [`super::frame`]). [`Answer`] says, for each request
//! kind, which response answers it and hands out its contents; anything else is an
//! [`UnexpectedResponse`], the peer's fault. [`ListObjects`] is the one request that takes
//! several round trips: it asks for the next page until the server says there is no more.

use super::message::MAX_LIST_ENTRIES;
use super::{
    ChunkIndex, ChunkSet, DatasetName, Digest, Manifest, ObjectEntry, ObjectPath, Request,
    Response, TransferId,
};

/// A response that does not answer the request (which of [`Response`]'s variants it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected response {0:?}")]
pub struct UnexpectedResponse(pub std::mem::Discriminant<Response>);

impl UnexpectedResponse {
    /// `r` did not answer the request.
    pub fn of(r: &Response) -> Self {
        Self(std::mem::discriminant(r))
    }
}

/// Which response answers which request: each function takes the response a request
/// received and hands out what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Answer;

impl Answer {
    /// `ListDatasets`: the datasets.
    pub fn datasets(r: Response) -> Result<Vec<DatasetName>, UnexpectedResponse> {
        match r {
            Response::Datasets(d) => Ok(d),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `PolicyWatch`: the server's policy epoch.
    pub fn policy(r: Response) -> Result<u64, UnexpectedResponse> {
        match r {
            Response::Policy { epoch } => Ok(epoch),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `Stat`: the object's manifest.
    pub fn manifest(r: Response) -> Result<Manifest, UnexpectedResponse> {
        match r {
            Response::Manifest(m) => Ok(m),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `OpenRead`: the transfer and the object's manifest.
    pub fn opened_read(r: Response) -> Result<(TransferId, Manifest), UnexpectedResponse> {
        match r {
            Response::OpenedRead { transfer, manifest } => Ok((transfer, manifest)),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `OpenWrite`: the transfer and the chunks the server already holds.
    pub fn opened_write(r: Response) -> Result<(TransferId, ChunkSet), UnexpectedResponse> {
        match r {
            Response::OpenedWrite { transfer, have } => Ok((transfer, have)),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `WriteChunk` of chunk `sent`: stored, and it must be that chunk.
    pub fn chunk_stored(r: Response, sent: ChunkIndex) -> Result<(), UnexpectedResponse> {
        match r {
            Response::ChunkStored(i) if i == sent => Ok(()),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }

    /// `Commit`: the root the server committed.
    pub fn committed(r: Response) -> Result<Digest, UnexpectedResponse> {
        match r {
            Response::Committed { root } => Ok(root),
            other => Err(UnexpectedResponse::of(&other)),
        }
    }
}

/// Listing the objects of a dataset under a prefix, page by page, in path order.
///
/// Call order: while [`ListObjects::poll_request`] hands out a request, send it and give
/// its response to [`ListObjects::handle_response`]; then [`ListObjects::into_entries`].
#[derive(Debug, Clone)]
pub struct ListObjects {
    dataset: DatasetName,
    prefix: String,
    /// The last path of the page before; `None` before the first page.
    start_after: Option<ObjectPath>,
    entries: Vec<ObjectEntry>,
    done: bool,
}

impl ListObjects {
    /// A listing of `dataset`'s objects whose paths start with `prefix`.
    pub fn new(dataset: DatasetName, prefix: String) -> Self {
        Self {
            dataset,
            prefix,
            start_after: None,
            entries: Vec::new(),
            done: false,
        }
    }

    /// The request for the next page; `None` once the listing is complete.
    pub fn poll_request(&self) -> Option<Request> {
        if self.done {
            return None;
        }
        Some(Request::ListObjects {
            dataset: self.dataset.clone(),
            prefix: self.prefix.clone(),
            start_after: self.start_after.clone(),
            limit: MAX_LIST_ENTRIES as u32,
        })
    }

    /// The answer to the last request. A page that says there is more but is empty ends the
    /// listing (asking again would ask for the same page).
    pub fn handle_response(&mut self, r: Response) -> Result<(), UnexpectedResponse> {
        let Response::Objects { entries, more } = r else {
            return Err(UnexpectedResponse::of(&r));
        };
        let last = entries.last().map(|e| e.path.clone());
        self.entries.extend(entries);
        match last {
            Some(last) if more => self.start_after = Some(last),
            _ => self.done = true,
        }
        Ok(())
    }

    /// Whether every page has been received.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Every entry received, in path order.
    pub fn into_entries(self) -> Vec<ObjectEntry> {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

    use super::*;

    fn entry(path: &str) -> ObjectEntry {
        ObjectEntry {
            path: ObjectPath::new(path).unwrap(),
            size: 1,
        }
    }

    fn dataset() -> DatasetName {
        DatasetName::new("scans").unwrap()
    }

    #[test]
    fn a_listing_asks_page_after_page_from_the_last_path_until_no_more() {
        let mut l = ListObjects::new(dataset(), "a/".into());
        let Some(Request::ListObjects { start_after, .. }) = l.poll_request() else {
            panic!("a first request");
        };
        assert_eq!(start_after, None);
        l.handle_response(Response::Objects {
            entries: vec![entry("a/1"), entry("a/2")],
            more: true,
        })
        .unwrap();
        let Some(Request::ListObjects {
            start_after,
            prefix,
            ..
        }) = l.poll_request()
        else {
            panic!("a second request");
        };
        assert_eq!(start_after, Some(ObjectPath::new("a/2").unwrap()));
        assert_eq!(prefix, "a/");
        l.handle_response(Response::Objects {
            entries: vec![entry("a/3")],
            more: false,
        })
        .unwrap();
        assert!(l.is_done());
        assert_eq!(l.poll_request(), None);
        let paths: Vec<String> = l
            .into_entries()
            .into_iter()
            .map(|e| e.path.as_str().to_owned())
            .collect();
        assert_eq!(paths, ["a/1", "a/2", "a/3"]);
    }

    #[test]
    fn an_empty_page_that_claims_more_ends_the_listing_instead_of_asking_forever() {
        let mut l = ListObjects::new(dataset(), String::new());
        l.handle_response(Response::Objects {
            entries: vec![],
            more: true,
        })
        .unwrap();
        assert!(l.is_done());
        assert_eq!(l.poll_request(), None);
    }

    #[test]
    fn a_response_of_another_kind_is_refused() {
        let mut l = ListObjects::new(dataset(), String::new());
        let wrong = Response::Datasets(vec![]);
        assert_eq!(
            l.handle_response(wrong.clone()),
            Err(UnexpectedResponse::of(&wrong))
        );
        assert_eq!(
            Answer::manifest(wrong.clone()).unwrap_err(),
            UnexpectedResponse::of(&wrong)
        );
        assert!(Answer::committed(wrong.clone()).is_err());
        assert!(Answer::opened_read(wrong.clone()).is_err());
        assert!(Answer::opened_write(wrong).is_err());
    }

    #[test]
    fn a_chunk_stored_answer_must_name_the_chunk_sent() {
        assert!(Answer::chunk_stored(Response::ChunkStored(ChunkIndex(3)), ChunkIndex(3)).is_ok());
        assert!(Answer::chunk_stored(Response::ChunkStored(ChunkIndex(4)), ChunkIndex(3)).is_err());
    }
}
