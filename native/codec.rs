// ramster.zcache._codec: the page codec's batch paths in native code, run without the GIL.
//
// A put batch is encoded here (LZ4, same-filled check, zpage framing with its checksum) and a
// get batch's zpages are opened here (key check, checksum, LZ4 decompression), each batch in one
// call that releases the GIL for the whole of it.  In Python, every page paid a call that took
// and gave back the GIL, so a codec worker thread and the event loop handed the GIL to each
// other per page and the node used one core however many workers it had; now a worker codes a
// chunk of pages while the loop files the previous one.  A batch of fewer than RELEASE_PAGES
// pages (a single get, a slice of puts on the loop) keeps the GIL: giving it up would let
// another thread take it while the event loop waits to have it back.
//
// The formats are codec.py's, byte for byte: a zpage is the 18-byte header "<IHIQ" (checksum,
// payload length, index, oid) then the payload; the checksum is the low 32 bits of XXH3-64 of the
// payload seeded with oid ^ index << 32; a payload of PAGE_SIZE bytes is a page stored raw.  The
// LZ4 blocks are plain LZ4 block format (liblz4 compresses them: compress.rs), which codec.py's
// single-page paths (the lz4 package) read and write too.  Decompression is lz4_flex's safe,
// bounds-checked decoder: a zpage may come from a disk file or a peer, and its checksum is no
// defence against a crafted payload.
//
// Trade-offs: the compressed payloads are copied once more, from one scratch buffer into their
// bytes objects, since their sizes are known only after compressing and a bytes object can only
// be made with the GIL; an opened page is decompressed straight into its bytes object, made
// (uninitialised) before the GIL is released.  Inputs are borrowed through the buffer protocol
// (table.rs's lean views: the buffers of a 128-page hop are taken and released with the GIL
// held, in the worker, while the event loop waits for it; measured, a hop of 128 zero pages,
// all overhead, took 91 against 106 us with pyo3's PyBuffer), so a memoryview of a request's
// bytes is compressed where it lies; whoever passes a view guarantees that nothing writes to
// it meanwhile, as for the lz4 package.
use pyo3::exceptions::{PyBufferError, PyOverflowError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PySequence, PyTuple};
use xxhash_rust::xxh3::xxh3_64_with_seed;

mod compress;
mod index;
mod pool;
mod raw;
mod slots;
mod table;
mod zpages;

use compress::Lz4;
use table::Table;

pub(crate) const PAGE_SIZE: usize = 4096;
pub(crate) const WORD: usize = 8;
pub(crate) const HEADER_SIZE: usize = 18;
// The most bytes LZ4 packs a same-filled page into (codec.py's SAME_FILLED_PACKED).
const SAME_FILLED_PACKED: usize = 48;

// Batches of fewer pages keep the GIL: releasing it lets another thread (a codec worker, gRPC's
// poller) take it, and the caller, a single get on the event loop, then waits for it back.
const RELEASE_PAGES: usize = 16;

pub(crate) type Key = (u64, u32);

/// A Python int as a u64, for the keys and handles the batch paths read a page at a time.
/// pyo3's u64 goes through PyLong_AsUnsignedLongLong, which on CPython 3.11 converts any int
/// of more than 30 bits (every tagged handle) through a byte array: ~280 instructions a handle,
/// a sixth of a rewrite's native frees (callgrind).  PyLong_AsUnsignedLong walks the digits
/// instead, and is 64 bits wide on the LP64 targets; errors are the same (TypeError,
/// OverflowError for a negative or too big int).
pub(crate) fn u64_of(item: &Bound<'_, PyAny>) -> PyResult<u64> {
    #[cfg(all(unix, target_pointer_width = "64"))]
    if item.is_exact_instance_of::<pyo3::types::PyInt>() {
        // SAFETY: an exact int, alive while `item` is borrowed; the GIL is held
        let value = unsafe { ffi::PyLong_AsUnsignedLong(item.as_ptr()) };
        if value == std::ffi::c_ulong::MAX {
            if let Some(err) = PyErr::take(item.py()) {
                return Err(err);
            }
        }
        return Ok(value);
    }
    item.extract()
}

/// An (object id, page index) key, read with u64_of: ~110 instructions where pyo3's tuple
/// extraction took ~270 (callgrind), twice per page of a put on the event loop.
pub(crate) fn key_of(item: &Bound<'_, PyAny>) -> PyResult<Key> {
    let pair = item.downcast::<PyTuple>()?;
    if pair.len() != 2 {
        return Err(PyValueError::new_err(
            "a key is an (object id, page index) pair",
        ));
    }
    let oid = u64_of(&*pair.get_borrowed_item(0)?)?;
    let index = u32::try_from(u64_of(&*pair.get_borrowed_item(1)?)?)
        .map_err(|_| PyOverflowError::new_err("a page index is under 2**32"))?;
    Ok((oid, index))
}

/// A batch's keys: a sequence of (object id, page index) pairs, each read with key_of.
pub(crate) struct Keys(pub(crate) Vec<Key>);

impl std::ops::Deref for Keys {
    type Target = Vec<Key>;

    fn deref(&self) -> &Vec<Key> {
        &self.0
    }
}

impl<'py> FromPyObject<'py> for Keys {
    fn extract_bound(keys: &Bound<'py, PyAny>) -> PyResult<Self> {
        let keys = keys.downcast::<PySequence>()?;
        let mut out = Vec::with_capacity(keys.len()?);
        for item in keys.try_iter()? {
            out.push(key_of(&item?)?);
        }
        Ok(Keys(out))
    }
}

/// `work` without the GIL if it codes RELEASE_PAGES pages or more, else with it.
fn without_gil<T: Send>(py: Python<'_>, pages: usize, work: impl FnOnce() -> T + Send) -> T {
    if pages >= RELEASE_PAGES {
        py.allow_threads(work)
    } else {
        work()
    }
}

fn checksum(payload: &[u8], (oid, index): Key) -> u32 {
    xxh3_64_with_seed(payload, oid ^ (u64::from(index) << 32)) as u32
}

/// The zpage header of `payload` filed under `key`.
fn header(payload: &[u8], (oid, index): Key) -> [u8; HEADER_SIZE] {
    let mut out = [0u8; HEADER_SIZE];
    out[..4].copy_from_slice(&checksum(payload, (oid, index)).to_le_bytes());
    out[4..6].copy_from_slice(&(payload.len() as u16).to_le_bytes());
    out[6..10].copy_from_slice(&index.to_le_bytes());
    out[10..].copy_from_slice(&oid.to_le_bytes());
    out
}

/// The bytes `obj` exports, `what` number `at` of a call's arguments: a C-contiguous buffer
/// (an exporter that cannot give one refuses, which is a ValueError here), through a Table,
/// which costs a fraction of a PyBuffer and is released without taking the GIL again.
pub(crate) fn bytes_of<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    at: usize,
) -> PyResult<Table<'py, u8>> {
    Table::new(obj, false).map_err(|err| {
        let py = obj.py();
        if err.is_instance_of::<PyBufferError>(py) {
            PyValueError::new_err(format!("{what} {at} is not contiguous: {err}"))
        } else if err.is_instance_of::<PyValueError>(py) {
            PyValueError::new_err(format!("{what} {at} is not bytes: {err}"))
        } else {
            err
        }
    })
}

/// What a put batch's page becomes: where its bytes are in the scratch buffer, or refused.
pub(crate) enum Encoded {
    At(usize, usize),
    Refused,
}

/// Scratch space of one batch's compressions, made once per batch rather than per page (in a
/// codec worker, each allocation is a call into a malloc lock the event loop shares): LZ4's
/// state and an output of LZ4's bound.
struct Compressor {
    lz4: Lz4,
    packed: Vec<u8>,
}

impl Compressor {
    fn new() -> Self {
        Compressor {
            lz4: Lz4::new(),
            packed: vec![0u8; compress::bound(PAGE_SIZE)],
        }
    }
}

/// Encode `page` onto the end of `out`, LZ4 compressing it into the compressor's output first.
fn encode_one(
    page: &[u8],
    key: Key,
    threshold: usize,
    store_raw: bool,
    compressor: &mut Compressor,
    out: &mut Vec<u8>,
) -> Encoded {
    let Compressor { lz4, packed } = compressor;
    let size = lz4.compress(page, packed);
    let start = out.len();
    let word = &page[..WORD];
    let payload = if size <= SAME_FILLED_PACKED && page.chunks_exact(WORD).all(|w| w == word) {
        out.extend_from_slice(word);
        return Encoded::At(start, out.len());
    } else if size <= threshold {
        &packed[..size]
    } else if store_raw {
        page
    } else {
        return Encoded::Refused;
    };
    out.extend_from_slice(&header(payload, key));
    out.extend_from_slice(payload);
    Encoded::At(start, out.len())
}

/// The buffers of a put batch's pages, as many pages as its `keys`: each buffer holds one page
/// or a run of whole pages back to back (a request's payload, cut nowhere).
pub(crate) fn page_tables<'py>(
    keys: usize,
    pages: &[Bound<'py, PyAny>],
) -> PyResult<Vec<Table<'py, u8>>> {
    let tables = pages
        .iter()
        .enumerate()
        .map(|(at, page)| bytes_of(page, "page", at))
        .collect::<PyResult<Vec<_>>>()?;
    let mut held = 0;
    for (at, table) in tables.iter().enumerate() {
        let length = table.values().len();
        if length == 0 || length % PAGE_SIZE != 0 {
            return Err(PyValueError::new_err(format!(
                "page {at} is {length} bytes, not whole pages of {PAGE_SIZE}"
            )));
        }
        held += length / PAGE_SIZE;
    }
    if keys != held {
        return Err(PyValueError::new_err(format!(
            "keys and pages differ in number: {keys} keys, {held} pages"
        )));
    }
    Ok(tables)
}

/// The pages of page_tables(), one slice each.
pub(crate) fn page_slices<'a>(tables: &'a [Table<'_, u8>]) -> impl Iterator<Item = &'a [u8]> {
    tables
        .iter()
        .flat_map(|table| table.values().chunks_exact(PAGE_SIZE))
}

/// A put batch's pages encoded (encode_one) onto one scratch buffer, and where each one is.
pub(crate) fn encode_all<'a>(
    pages: impl ExactSizeIterator<Item = &'a [u8]>,
    keys: &[Key],
    threshold: usize,
    store_raw: bool,
) -> (Vec<u8>, Vec<Encoded>) {
    let mut scratch = Vec::with_capacity(pages.len() * 2048);
    let mut compressor = Compressor::new();
    let spans = pages
        .zip(keys)
        .map(|(page, &key)| {
            encode_one(
                page,
                key,
                threshold,
                store_raw,
                &mut compressor,
                &mut scratch,
            )
        })
        .collect();
    (scratch, spans)
}

/// Each encoding of encode_all() as a bytes object, None where the page was refused.
pub(crate) fn encoded_bytes<'py>(
    py: Python<'py>,
    scratch: &[u8],
    spans: &[Encoded],
) -> Vec<Option<Bound<'py, PyBytes>>> {
    spans
        .iter()
        .map(|span| match *span {
            Encoded::At(start, stop) => Some(PyBytes::new(py, &scratch[start..stop])),
            Encoded::Refused => None,
        })
        .collect()
}

/// Per page of a checked put batch (buffers of one or more whole 4096-byte pages back to back,
/// as many pages as keys): its word if it is same-filled (8 bytes),
/// its zpage (compressed, or raw under store_raw when it compresses to more than `threshold`
/// bytes), or None (refused for poor compression).
#[pyfunction]
fn encode_pages<'py>(
    py: Python<'py>,
    keys: Keys,
    pages: Vec<Bound<'py, PyAny>>,
    threshold: usize,
    store_raw: bool,
) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
    let tables = page_tables(keys.len(), &pages)?;
    let slices: Vec<&[u8]> = page_slices(&tables).collect();
    let (scratch, spans) = without_gil(py, slices.len(), || {
        encode_all(slices.iter().copied(), &keys, threshold, store_raw)
    });
    Ok(encoded_bytes(py, &scratch, &spans))
}

/// The page in `zpage`, checked against `key`, into `page`; else what is wrong with it.
fn open_one(zpage: &[u8], key: Key, page: &mut [u8]) -> Result<(), String> {
    let (oid, index) = key;
    if zpage.len() < HEADER_SIZE {
        return Err(format!(
            "zpage for oid={oid} index={index} is {} bytes",
            zpage.len()
        ));
    }
    let word = |at: usize, n: usize| {
        zpage[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |v, &b| v << 8 | u64::from(b))
    };
    let (sum, length) = (word(0, 4) as u32, word(4, 2) as usize);
    let (zindex, zoid) = (word(6, 4) as u32, word(10, 8));
    if (zoid, zindex) != key {
        return Err(format!(
            "zpage filed under oid={oid} index={index} names oid={zoid} index={zindex}"
        ));
    }
    let payload = &zpage[HEADER_SIZE..zpage.len().min(HEADER_SIZE + length)];
    if payload.len() != length || checksum(payload, key) != sum {
        return Err(format!(
            "zpage for oid={oid} index={index} failed its checksum"
        ));
    }
    if length == PAGE_SIZE {
        page.copy_from_slice(payload);
        return Ok(());
    }
    match lz4_flex::block::decompress_into(payload, page) {
        Ok(PAGE_SIZE) => Ok(()),
        Ok(n) => Err(format!(
            "zpage for oid={oid} index={index} decompresses to {n} bytes"
        )),
        Err(_) => Err(format!(
            "zpage for oid={oid} index={index} does not decompress"
        )),
    }
}

/// `count` new bytes objects of PAGE_SIZE uninitialised bytes, and the addresses of their bytes
/// (for the GIL-free part: nothing else holds these objects until they are filled and handed
/// out).
pub(crate) fn blank_pages(
    py: Python<'_>,
    count: usize,
) -> PyResult<(Vec<Bound<'_, PyBytes>>, Vec<usize>)> {
    let mut pages = Vec::with_capacity(count);
    let mut targets = Vec::with_capacity(count);
    for _ in 0..count {
        // SAFETY: a new bytes object, owned here alone; a failed call sets the Python error
        // fetched here.
        let page = unsafe { ffi::PyBytes_FromStringAndSize(std::ptr::null(), PAGE_SIZE as _) };
        let page = unsafe { Bound::from_owned_ptr_or_err(py, page)?.downcast_into_unchecked() };
        targets.push(unsafe { ffi::PyBytes_AsString(page.as_ptr()) } as usize);
        pages.push(page);
    }
    Ok((pages, targets))
}

/// open_one() of each zpage into the PAGE_SIZE bytes at its target (from blank_pages()).
pub(crate) fn open_into<'a>(
    zpages: impl Iterator<Item = &'a [u8]>,
    keys: &[Key],
    targets: &[usize],
) -> Vec<Result<(), String>> {
    zpages
        .zip(keys)
        .zip(targets)
        .map(|((zpage, &key), &target)| {
            // SAFETY: `target` is the PAGE_SIZE-byte buffer of a bytes object of blank_pages(),
            // which only this call writes.
            let page = unsafe { std::slice::from_raw_parts_mut(target as *mut u8, PAGE_SIZE) };
            open_one(zpage, key, page)
        })
        .collect()
}

/// Each page filled by open_into(), or a str saying why its zpage is corrupt.
pub(crate) fn opened_pages<'py>(
    py: Python<'py>,
    pages: Vec<Bound<'py, PyBytes>>,
    results: Vec<Result<(), String>>,
) -> Vec<Bound<'py, PyAny>> {
    pages
        .into_iter()
        .zip(results)
        .map(|(page, result)| match result {
            Ok(()) => page.into_any(),
            Err(why) => pyo3::types::PyString::new(py, &why).into_any(),
        })
        .collect()
}

/// Each zpage opened against its key: a 4096-byte page, or a str saying why it is corrupt.
fn open_all<'py>(
    py: Python<'py>,
    keys: &[Key],
    zpages: &[&[u8]],
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let (pages, targets) = blank_pages(py, zpages.len())?;
    let results = without_gil(py, zpages.len(), || {
        open_into(zpages.iter().copied(), keys, &targets)
    });
    Ok(opened_pages(py, pages, results))
}

/// Per zpage, verified against its key: the 4096-byte page, or a str saying why it is corrupt;
/// the zpages start at `offsets` in one buffer (the engine's arena, read in place, or copies
/// back to back): a zpage's header says where it ends, and one that would end past the buffer
/// is corrupt.
#[pyfunction]
fn open_zpages_at<'py>(
    py: Python<'py>,
    keys: Keys,
    buffer: Bound<'py, PyAny>,
    offsets: Vec<usize>,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let table = bytes_of(&buffer, "buffer", 0)?;
    let slices = zpages_at(keys.len(), table.values(), &offsets)?;
    open_all(py, &keys, &slices)
}

/// The zpages of `keys` that start at `offsets` in `whole`, each to the end of it.
pub(crate) fn zpages_at<'a>(
    keys: usize,
    whole: &'a [u8],
    offsets: &[usize],
) -> PyResult<Vec<&'a [u8]>> {
    if keys != offsets.len() {
        return Err(PyValueError::new_err("keys and offsets differ in number"));
    }
    Ok(offsets
        .iter()
        .map(|&at| &whole[at.min(whole.len())..])
        .collect())
}

#[pymodule]
fn _codec(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(encode_pages, module)?)?;
    module.add_function(wrap_pyfunction!(open_zpages_at, module)?)?;
    module.add_function(wrap_pyfunction!(index::index_get, module)?)?;
    module.add_function(wrap_pyfunction!(index::index_update, module)?)?;
    module.add_function(wrap_pyfunction!(raw::raw_file, module)?)?;
    module.add_function(wrap_pyfunction!(raw::raw_free, module)?)?;
    module.add_class::<slots::Slots>()?;
    module.add_class::<pool::CodecPool>()?;
    module.add_class::<zpages::Zpages>()?;
    Ok(())
}
