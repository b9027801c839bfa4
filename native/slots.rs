// The common case of a get batch's walk over a zsmalloc pool, in native code.
//
// ZCache._read (ramster/zcache/cache.py) walks a batch's handles one by one in Python: per page
// a few tests, an LRU tick store and a slice of the arena, about a quarter of the event loop's
// time on NBD reads.  Most handles of a batch that does not remove its pages are zpages in the
// pool's zsmalloc, or misses; SlotWalk.walk() takes those here, from a given position, and stops
// at the first handle that is anything else (a same-filled word, a raw page, an evicted page),
// which the Python walk then takes before calling again.  So the slow kinds keep their one
// implementation, and this one only mirrors zsmalloc's slot arithmetic (Zsmalloc.read/locate):
// handle = zspage id << slot_bits | slot; a slot of class `c` starts at slot * sizes[c] in its
// zspage, whose frames are frame[zid * max_frames ..]; the constants come from the Python side,
// and tests/zcache/test_native_walk.py holds the two walks to the same answers.
//
// Every index is checked (a zspage id past the arrays, a frame past the arena): a bad handle is
// a ValueError, never a read out of bounds.  The GIL is kept: the walk copies little and is the
// event loop's own work.
use pyo3::buffer::{PyBuffer, ReadOnlyCell};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::bytes_of;

const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// zsmalloc's slot layout, as ramster/zcache/zsmalloc.py defines it.
#[pyclass(frozen)]
pub struct SlotWalk {
    slot_bits: u32,    // handle = zspage id << slot_bits | slot
    max_frames: usize, // frame-table entries per zspage
    sizes: Vec<usize>, // slot size per class
}

fn bad(what: &str) -> PyErr {
    PyValueError::new_err(format!("zsmalloc walk: {what}"))
}

type Span = std::ops::Range<usize>;

impl SlotWalk {
    /// Where the slot of allocator handle `h` lies in an arena of `arena` bytes: its part in
    /// its first frame and, if it straddles into the next frame of its zspage, the rest there.
    fn place(
        &self,
        h: u64,
        cls: &[ReadOnlyCell<u16>],
        frame: &[ReadOnlyCell<u32>],
        arena: usize,
    ) -> PyResult<(Span, Option<Span>)> {
        let zid = (h >> self.slot_bits) as usize;
        let slot = (h & ((1 << self.slot_bits) - 1)) as usize;
        let class = cls
            .get(zid)
            .ok_or_else(|| bad("zspage id past the table"))?
            .get();
        let size = *self
            .sizes
            .get(class as usize)
            .ok_or_else(|| bad("unknown size class"))?;
        let offset = slot * size;
        let within = offset & (PAGE_SIZE - 1);
        let index = offset >> PAGE_SHIFT;
        let straddles = within + size > PAGE_SIZE;
        if index + usize::from(straddles) >= self.max_frames {
            return Err(bad("slot past its zspage"));
        }
        let first = zid * self.max_frames + index;
        let frame_at = |i: usize| -> PyResult<usize> {
            let f = frame
                .get(i)
                .ok_or_else(|| bad("frame index past the table"))?;
            let start = (f.get() as usize) << PAGE_SHIFT;
            if start + PAGE_SIZE > arena {
                return Err(bad("frame past the arena"));
            }
            Ok(start)
        };
        let start = frame_at(first)? + within;
        if !straddles {
            return Ok((start..start + size, None));
        }
        let next = frame_at(first + 1)?;
        let head = PAGE_SIZE - within;
        Ok((start..start + head, Some(next..next + size - head)))
    }
}

#[pymethods]
impl SlotWalk {
    #[new]
    fn new(slot_bits: u32, max_frames: usize, sizes: Vec<usize>) -> Self {
        SlotWalk {
            slot_bits,
            max_frames,
            sizes,
        }
    }

    /// Walk `handles` (index handles: `tag` marks those of this zsmalloc, whose own handle is
    /// in the bits of `mask`) from `first` while each is a zpage of this zsmalloc (`cls`,
    /// `frame`: its tables; `arena`: the arena's buffer) or 0 (a miss, left as it is): each
    /// zpage's unit gets the next tick in `ticks` (indexed by zspage id); it is copied out of the arena into
    /// `zpages` with its position in `at` when `copy` or when it straddles two frames, else
    /// only its position goes to `in_place` and its start to `offsets`.  Returns where the walk
    /// stopped (the first handle of another kind, or the end), the last tick given, and the
    /// misses met.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        py: Python<'_>,
        handles: &Bound<'_, PyList>,
        first: usize,
        tag: u64,
        mask: u64,
        tick: u64,
        ticks: PyBuffer<u64>,
        cls: PyBuffer<u16>,
        frame: PyBuffer<u32>,
        arena: PyBuffer<u8>,
        copy: bool,
        at: &Bound<'_, PyList>,
        zpages: &Bound<'_, PyList>,
        in_place: &Bound<'_, PyList>,
        offsets: &Bound<'_, PyList>,
    ) -> PyResult<(usize, u64, usize)> {
        let ticks = ticks
            .as_mut_slice(py)
            .ok_or_else(|| bad("ticks are read-only"))?;
        let cls = cls
            .as_slice(py)
            .ok_or_else(|| bad("class table not contiguous"))?;
        let frame = frame
            .as_slice(py)
            .ok_or_else(|| bad("frame table not contiguous"))?;
        let whole = bytes_of(&arena, "arena", 0)?;
        let (mut tick, mut misses, mut i) = (tick, 0usize, first);
        while i < handles.len() {
            let handle: u64 = handles.get_item(i)?.extract()?;
            if handle == 0 {
                misses += 1;
                i += 1;
                continue;
            }
            let h = handle ^ tag;
            if h > mask {
                break; // another kind: the Python walk takes it
            }
            let (head, rest) = self.place(h, cls, frame, whole.len())?;
            tick += 1;
            let unit = (h >> self.slot_bits) as usize;
            ticks
                .get(unit)
                .ok_or_else(|| bad("zspage id past the ticks"))?
                .set(tick);
            match rest {
                None if !copy => {
                    in_place.append(i)?;
                    offsets.append(head.start)?;
                }
                None => {
                    at.append(i)?;
                    zpages.append(PyBytes::new(py, &whole[head]))?;
                }
                Some(rest) => {
                    let slot = [&whole[head], &whole[rest]].concat();
                    at.append(i)?;
                    zpages.append(PyBytes::new(py, &slot))?;
                }
            }
            i += 1;
        }
        Ok((i, tick, misses))
    }
}
