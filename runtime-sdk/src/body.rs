//! Request and response bodies as `std::io` streams over `wasi:http` body resources.

use std::io::{self, Read, Write};

use wasip2::http::types::{IncomingBody, OutgoingBody};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

/// How many bytes one read asks the host for.
const READ_CHUNK: u64 = 64 * 1024;

/// A request body as a `std::io::Read`, read from the host as the app asks for it.
pub struct BodyReader {
    // Field order matters: a `wasi:io` stream must be dropped before the body resource it belongs to.
    stream: InputStream,
    _body: IncomingBody,
}

pub(crate) enum ReadError {
    TooLarge,
    Io(String),
}

impl BodyReader {
    pub(crate) fn new(body: IncomingBody) -> Option<BodyReader> {
        let stream = body.stream().ok()?;
        Some(BodyReader { stream, _body: body })
    }

    /// The next chunk as the host delivers it; `None` at the end of the body.
    pub fn chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self.stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => Ok(Some(chunk)),
            Err(StreamError::Closed) => Ok(None),
            Err(StreamError::LastOperationFailed(error)) => Err(io::Error::other(error.to_debug_string())),
        }
    }

    pub(crate) fn read_to_limit(&mut self, limit: usize) -> Result<Vec<u8>, ReadError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.chunk().map_err(|error| ReadError::Io(error.to_string()))? {
            if all.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge);
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(&mut self.stream, buf)
    }
}

/// A response body as a `std::io::Write`. Each write waits until the host has room, so a slow client slows the
/// app down instead of the body piling up in memory.
pub struct BodyWriter {
    stream: Option<OutputStream>,
    /// Whether bytes were written since the last flush (a small write flushes itself).
    unflushed: bool,
}

/// The most `blocking-write-and-flush` takes in one call (the `wasi:io` contract).
const SMALL_WRITE: usize = 4096;

impl BodyWriter {
    pub(crate) fn new(body: &OutgoingBody) -> BodyWriter {
        BodyWriter {
            stream: body.write().ok(),
            unflushed: false,
        }
    }

    pub(crate) fn write_all_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)?;
        self.flush()
    }
}

fn stream_error(error: StreamError) -> io::Error {
    match error {
        StreamError::Closed => io::ErrorKind::BrokenPipe.into(),
        StreamError::LastOperationFailed(error) => io::Error::other(error.to_debug_string()),
    }
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(stream) = &mut self.stream else {
            return Err(io::Error::other("the response body was already taken"));
        };
        // A small write goes in one host call that also waits for room; a large one asks how much fits first, so
        // it moves in the host's (larger) chunks.
        if buf.len() <= SMALL_WRITE {
            stream.blocking_write_and_flush(buf).map_err(stream_error)?;
            self.unflushed = false;
            return Ok(buf.len());
        }
        match Write::write(stream, buf)? {
            0 => Err(io::ErrorKind::BrokenPipe.into()),
            n => {
                self.unflushed = true;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Some(stream) if self.unflushed => {
                self.unflushed = false;
                stream.blocking_flush().map_err(stream_error)
            }
            _ => Ok(()),
        }
    }
}
