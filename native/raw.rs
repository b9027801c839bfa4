// Raw frames' batch paths (ramster/zcache/rawframes.py): a run of a put batch's raw zpages filed,
// each into a frame of its own, and a run of raw handles freed, in one native call each.
//
// A raw zpage is the 18-byte header and the page as it came: a block device's export stores
// incompressible pages so (node/nbd/blocks.py).  Filed one by one in Python, each cost the event
// loop ~4 us (the id, the frame, the header, the copy, the LRU heap push, the handle), and an NBD
// rewrite of incompressible pages was bound by the loop at 1.0 CPU-s per GiB.  Here the loop
// pays a call per run.  What stays in Python is what changes the shape of RawFrames' tables or
// calls out: ids beyond the tables (Python grows them and hands ids in, as `spare`), the arena's
// frames (lent LEND at a time, slots.rs's Lent; frames freed go back in one Arena.free_many),
// the first push onto an empty LRU list (which wakes the zcache-wide LRU heap), and the counts.
//
// The LRU heap push is an append: every entry is `tick << 32 | id` and a store gets a tick newer
// than any before, so the new entry is the heap's largest and its place is the end; the parent
// is checked all the same, and a push that would not be the largest stops the run (the Python
// path then uses heapq).
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::slots::{Item, Items, Lent};
use crate::table::Table;
use crate::{u64_of, HEADER_SIZE, PAGE_SIZE};

const RAW_ZPAGE: usize = HEADER_SIZE + PAGE_SIZE;
const UID_BITS: u32 = 32; // ramster/zcache/lru.py's _UID_BITS

fn bad(what: &str) -> PyErr {
    PyValueError::new_err(format!("raw frames: {what}"))
}

/// File the raw zpages of `items` (a list or Zpages) from `first` on into RawFrames `raw`: each
/// gets an id from the end of `spare` (ids below the tables' size, not in use), a frame from the
/// arena (lent into `lent`), its header in `raw.header` and the tick `tick` + 1 on the LRU list;
/// `tag | id` goes to `handles` and `stored` to `results`.  Stops at an item that is not a raw
/// zpage, when `spare` or the arena runs dry, when the LRU list is empty (its first push wakes
/// the heap over all lists: Python's) or a push would not be the heap's largest.  Returns where
/// it stopped, the last tick given and the zpages filed.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn raw_file(
    py: Python<'_>,
    raw: &Bound<'_, PyAny>,
    items: &Bound<'_, PyAny>,
    first: usize,
    tag: u64,
    tick: u64,
    stored: &Bound<'_, PyAny>,
    handles: &Bound<'_, PyList>,
    results: &Bound<'_, PyList>,
    lent: &Bound<'_, PyList>,
    spare: &Bound<'_, PyList>,
) -> PyResult<(usize, u64, usize)> {
    let lru = raw.getattr(intern!(py, "lru"))?;
    let live: usize = lru.getattr(intern!(py, "live"))?.extract()?;
    let items = Items::of(items)?;
    if live == 0 {
        return Ok((first, tick, 0));
    }
    let arena = raw.getattr(intern!(py, "arena"))?;
    let map = Table::<u8>::of(&arena, intern!(py, "map"), true)?;
    let frame = Table::<u32>::of(raw, intern!(py, "frame"), true)?;
    let ticks = Table::<u64>::of(&lru, intern!(py, "tick"), true)?;
    let queued = Table::<u64>::of(&lru, intern!(py, "queued"), true)?;
    let header = raw.getattr(intern!(py, "header"))?;
    let header = header.downcast::<PyList>()?;
    let heap = lru.getattr(intern!(py, "_heap"))?;
    let heap = heap.downcast::<PyList>()?;
    let (frame, ticks, queued) = (frame.cells_mut()?, ticks.cells_mut()?, queued.cells_mut()?);
    let (base, arena_len) = map.raw();
    let mut lent = Lent::new(arena, lent);
    let (mut i, mut tick, mut filed) = (first, tick, 0usize);
    while i < items.len() {
        let item = items.get(i)?;
        let Some(zpage) = item
            .as_ref()
            .map(Item::bytes)
            .filter(|z| z.len() == RAW_ZPAGE)
        else {
            break; // a zpage, a same-filled word, a refusal: not this path's
        };
        let Some(last) = spare.len().checked_sub(1) else {
            break; // no id ready: Python makes room
        };
        let entry = (tick + 1) << UID_BITS;
        if let Some(parent) = heap.len().checked_sub(1).map(|n| n / 2) {
            if u64_of(&heap.get_item(parent)?)? > entry {
                break; // not the largest (never, as ticks only grow): heapq's
            }
        }
        if !lent.available()? {
            break; // the arena is full: the Python path reclaims
        }
        let rid: usize = spare.get_item(last)?.extract()?;
        let (Some(slot), Some(t), Some(q)) = (frame.get(rid), ticks.get(rid), queued.get(rid))
        else {
            return Err(bad("a spare id past the tables"));
        };
        if q.get() != 0 {
            return Err(bad("a spare id in use"));
        }
        let got = lent
            .take()?
            .ok_or_else(|| bad("a lent frame went missing"))?;
        let at = got as usize * PAGE_SIZE;
        if at + PAGE_SIZE > arena_len {
            return Err(bad("a frame past the arena"));
        }
        spare.del_item(last)?;
        // SAFETY: the frame lies in the arena (checked above), which stays exported and
        // unresized while `map` lives; nothing else writes it while the GIL is held.
        unsafe {
            let page = &zpage[HEADER_SIZE..];
            std::ptr::copy_nonoverlapping(page.as_ptr(), base.add(at), PAGE_SIZE);
        }
        slot.set(got);
        header.set_item(rid, PyBytes::new(py, &zpage[..HEADER_SIZE]))?;
        tick += 1;
        t.set(tick);
        q.set(tick);
        heap.append(tick << UID_BITS | rid as u64)?;
        handles.append(tag | rid as u64)?;
        results.append(stored)?;
        filed += 1;
        i += 1;
    }
    Ok((i, tick, filed))
}

/// Free the raw zpages of `handles` (index handles: `tag` marks RawFrames `raw`'s, whose id is
/// in the bits of `mask`) from `first` on: each id's header and LRU entry cleared, its frame
/// appended to `frames` and the id to `ids`, for the caller to give back.  Stops at a handle of
/// another kind.  Returns where it stopped.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn raw_free(
    py: Python<'_>,
    raw: &Bound<'_, PyAny>,
    handles: &Bound<'_, PyList>,
    first: usize,
    tag: u64,
    mask: u64,
    frames: &Bound<'_, PyList>,
    ids: &Bound<'_, PyList>,
) -> PyResult<usize> {
    let lru = raw.getattr(intern!(py, "lru"))?;
    let frame = Table::<u32>::of(raw, intern!(py, "frame"), false)?;
    let queued = Table::<u64>::of(&lru, intern!(py, "queued"), true)?;
    let header = raw.getattr(intern!(py, "header"))?;
    let header = header.downcast::<PyList>()?;
    let (frame, queued) = (frame.cells(), queued.cells_mut()?);
    let empty = PyBytes::new(py, b"");
    let mut i = first;
    while i < handles.len() {
        let h = u64_of(&handles.get_item(i)?)? ^ tag;
        if h > mask {
            break; // another kind: the caller takes it
        }
        let rid = h as usize;
        let (Some(slot), Some(q)) = (frame.get(rid), queued.get(rid)) else {
            return Err(bad("a handle past the tables"));
        };
        if q.get() == 0 {
            return Err(bad("a free of a frame not in use"));
        }
        q.set(0);
        header.set_item(rid, &empty)?;
        frames.append(slot.get())?;
        ids.append(rid)?;
        i += 1;
    }
    Ok(i)
}
