// ramster.zcache._codec.Zpages: a put hop's encodings as a codec worker made them, one buffer
// and where each page's encoding lies in it, handed to the event loop's filing as they are.
//
// A worker's encodings used to become a list of bytes objects on the loop (CodecPool.finished),
// one allocation and one copy per page, which the filing (Slots.file) then copied into the
// arena and the loop freed again: measured on NBD writes of the gcc corpus, finished() alone
// took 0.13-0.18 s of the loop's CPU per GiB.  Zpages keeps the worker's buffer; Slots.file reads
// the zpages straight out of it, and only a page that the Python path files (a raw page, a
// same-filled word, a refusal, a zpage met at the pool limit) becomes a bytes object, when it
// is indexed.  It is a read-only sequence of bytes or None, as encode_pages' list is, so the
// filing's Python paths and any other reader take it as they took the list.
//
// Trade-off: the buffer lives until the hop is filed, as the bytes objects did; it holds the
// encodings back to back (no per-object header), so it takes less memory than they did.
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::Encoded;

#[pyclass(frozen, sequence, module = "ramster.zcache._codec")]
pub struct Zpages {
    scratch: Vec<u8>,
    spans: Vec<Encoded>,
}

impl Zpages {
    pub(crate) fn new(scratch: Vec<u8>, spans: Vec<Encoded>) -> Self {
        Zpages { scratch, spans }
    }

    /// The encoding of page `i`: its bytes, or None if it was refused or `i` is past the end.
    pub(crate) fn encoding(&self, i: usize) -> Option<&[u8]> {
        match self.spans.get(i)? {
            Encoded::At(start, stop) => Some(&self.scratch[*start..*stop]),
            Encoded::Refused => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }
}

#[pymethods]
impl Zpages {
    fn __len__(&self) -> usize {
        self.len()
    }

    /// Page `i`'s encoding as bytes (a zpage, a same-filled word), or None (refused).
    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let at = if i < 0 { i + self.len() as isize } else { i };
        let at = usize::try_from(at)
            .ok()
            .filter(|&at| at < self.len())
            .ok_or_else(|| PyIndexError::new_err("zpage index out of range"))?;
        Ok(self.encoding(at).map(|bytes| PyBytes::new(py, bytes)))
    }
}
