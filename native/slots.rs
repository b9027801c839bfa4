// The common cases of zsmalloc's batch paths, in native code: a get batch's walk over its
// handles, a put batch's filing of its zpages, and the frees of the zpages a put replaces.
//
// ZCache (ramster/zcache/cache.py) walked a get batch's handles, filed a put batch's zpages and
// freed the pages they replaced one by one in Python: per page a few tests, an LRU tick, a
// slot found and marked or cleared, a zspage regrouped, and a slice of the arena; that was most
// of the event loop's time on NBD reads and writes.  Slots takes the common cases from a given
// position on, and stops at the first page it does not take, which the Python path then takes
// before calling again:
//   - walk(): zpages of the pool's zsmalloc and misses; it stops at any other kind of handle
//     (same-filled, raw, evicted); the zpages it copies out (all of them for a codec worker,
//     only those straddling two frames otherwise) go back to back into one bytearray;
//   - file(): zpages, into their class's hot zspage, else the fullest zspage of its fullness
//     groups, else a new zspage under an id its caller readied (the tables cannot grow while
//     they are borrowed here), growing them by frames the arena lends a few at a time, and
//     cooling a hot zspage back into its group as it fills; it passes over same-filled words,
//     listing where they are for the caller to file, and stops at anything else (a raw page, a
//     refusal), at a new zspage with no id ready, and when the arena gives no frame;
//   - free(): zpages of the pool's zsmalloc, regrouping their zspages; it passes over the
//     handles of one other kind (same-filled words), listing them for the caller, and stops
//     before a free that empties its zspage (releasing it is Python's), makes its class worth
//     compacting (the reaper's callback), or cools its class's hot zspage.
// Passing over the words rather than stopping there matters: a stop and a new call cost ~45,000
// instructions (the Python wrapper's, and the tables borrowed again), a third of all filing's on
// a rewrite of the gcc corpus, whose put batches hold a same-filled page in 18 (callgrind).
// So the slow cases keep their one implementation, and this one mirrors zsmalloc's slot
// arithmetic and its bookkeeping (Zsmalloc.read/locate/_store/_reach/_pick/_regroup/free):
// handle = zspage id << slot_bits | slot; a slot of class `c` starts at slot * sizes[c] in its
// zspage, whose frames are frame[zid * max_frames ..] (a prefix of them owned); used slots are
// a bitmap of 2**slot_bits bits per zspage; the fullness groups are dicts of zspage ids, per
// class a list of groups + 1 of them (the last: growable).  The tables are the Zsmalloc
// object's own arrays and dicts, read by name, and its constants come from zsmalloc.py;
// tests/zcache/test_native_slots.py holds each native path to the Python one.
//
// Every index is checked (a zspage id past the tables, a slot past its zspage, a frame past the
// arena, a free of a slot not in use): a bad handle or table is a ValueError, never an access
// out of bounds.  The GIL is kept: this is the event loop's own work, and it copies little.
use pyo3::buffer::ReadOnlyCell;
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList};

use crate::table::Table;
use crate::zpages::Zpages;
use crate::{u64_of, HEADER_SIZE, PAGE_SIZE, WORD};

const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

type Span = std::ops::Range<usize>;
type Cells<'a, T> = &'a [ReadOnlyCell<T>];
type MutCells<'a, T> = &'a [std::cell::Cell<T>];

/// The encodings a filing reads: a codec worker's Zpages, in place, or encode_pages' list of
/// bytes or None.
#[derive(Clone, Copy)]
pub(crate) enum Items<'a, 'py> {
    Packed(&'a Zpages),
    List(&'a Bound<'py, PyList>),
}

impl<'a, 'py> Items<'a, 'py> {
    pub(crate) fn of(items: &'a Bound<'py, PyAny>) -> PyResult<Self> {
        Ok(match items.downcast::<Zpages>() {
            Ok(packed) => Items::Packed(packed.get()),
            Err(_) => Items::List(items.downcast::<PyList>()?),
        })
    }

    pub(crate) fn len(self) -> usize {
        match self {
            Items::Packed(packed) => packed.len(),
            Items::List(list) => list.len(),
        }
    }

    /// Encoding `i`, None where it is a refusal (None, or anything but bytes in a list).
    pub(crate) fn get(self, i: usize) -> PyResult<Option<Item<'a, 'py>>> {
        Ok(match self {
            Items::Packed(packed) => packed.encoding(i).map(Item::Slice),
            Items::List(list) => list
                .get_item(i)?
                .downcast_into::<PyBytes>()
                .ok()
                .map(Item::Bytes),
        })
    }
}

/// One of Items: a worker's encoding where it lies, or a list's bytes object, held while its
/// bytes are read.
pub(crate) enum Item<'a, 'py> {
    Slice(&'a [u8]),
    Bytes(Bound<'py, PyBytes>),
}

impl Item<'_, '_> {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Item::Slice(slice) => slice,
            Item::Bytes(bytes) => bytes.as_bytes(),
        }
    }
}

/// Frames the arena lends a put batch's filing: its lend() appends LEND of them at a time (fewer
/// at its limit, none when full) to the caller's list, from which each store takes the last, so
/// the filing pays a Python call per LEND frames rather than per frame; the caller gives back
/// what is left when the batch is filed (Zsmalloc.file).
pub(crate) struct Lent<'a, 'py> {
    arena: Bound<'py, PyAny>,
    frames: &'a Bound<'py, PyList>,
    dry: bool, // the arena had none left
}

const LEND: usize = 16;

impl<'a, 'py> Lent<'a, 'py> {
    pub(crate) fn new(arena: Bound<'py, PyAny>, frames: &'a Bound<'py, PyList>) -> Self {
        Lent {
            arena,
            frames,
            dry: false,
        }
    }

    /// Whether a frame can be had (lent already, or now).
    pub(crate) fn available(&mut self) -> PyResult<bool> {
        if self.frames.is_empty() && !self.dry {
            let py = self.arena.py();
            self.arena
                .call_method1(intern!(py, "lend"), (self.frames, LEND))?;
            self.dry = self.frames.is_empty();
        }
        Ok(!self.frames.is_empty())
    }

    /// The next frame, or None when the arena has no more.
    pub(crate) fn take(&mut self) -> PyResult<Option<u32>> {
        self.available()?;
        let Some(last) = self.frames.len().checked_sub(1) else {
            return Ok(None);
        };
        let frame = self.frames.get_item(last)?.extract()?;
        self.frames.del_item(last)?;
        Ok(Some(frame))
    }
}

/// zsmalloc's layout, as ramster/zcache/zsmalloc.py defines it.
#[pyclass(frozen)]
pub struct Slots {
    slot_bits: u32,           // handle = zspage id << slot_bits | slot
    max_frames: usize,        // frame-table entries per zspage
    sizes: Vec<usize>,        // slot size per class
    slots: Vec<usize>,        // slots per zspage per class
    owned: Vec<Vec<usize>>,   // per class, the slots lying wholly in its first n frames
    length_class: Vec<usize>, // the class of a zpage of each length
    groups: usize,            // fullness groups of zspages with room in their owned frames
    quarter: Vec<Vec<usize>>, // per class and group: the zpage count that leaves it upward
}

fn bad(what: &str) -> PyErr {
    PyValueError::new_err(format!("zsmalloc: {what}"))
}

fn cell<T: Copy>(cells: &[impl CellGet<T>], i: usize, what: &str) -> PyResult<T> {
    Ok(cells.get(i).ok_or_else(|| bad(what))?.value())
}

/// Reading a cell of either kind of buffer slice.
trait CellGet<T> {
    fn value(&self) -> T;
}

impl<T: Copy + pyo3::buffer::Element> CellGet<T> for ReadOnlyCell<T> {
    fn value(&self) -> T {
        self.get()
    }
}

impl<T: Copy> CellGet<T> for std::cell::Cell<T> {
    fn value(&self) -> T {
        self.get()
    }
}

impl Slots {
    /// The fullness group of a zspage of class `class` holding `count` zpages in frames that
    /// own `owned` slots (-1: full; `groups`: growable), and its edge: the count at which a
    /// store must regroup it again (Zsmalloc._regroup).
    fn fullness(&self, class: usize, count: usize, owned: usize) -> (i8, usize) {
        let slots = self.slots[class];
        if count >= slots {
            (-1, slots + 1) // full: only a free changes that
        } else if count < owned {
            let g = count * self.groups / slots;
            (g as i8, self.quarter[class][g].min(owned))
        } else {
            (self.groups as i8, 0) // growable
        }
    }

    /// Move zspage `zid` of class `class` from fullness group `old` to `new` (-1: none) in
    /// the groups' dicts of zspage ids.
    fn move_group(
        groups: &Bound<'_, PyAny>,
        class: usize,
        zid: usize,
        old: i8,
        new: i8,
    ) -> PyResult<()> {
        let rows = groups.get_item(class)?;
        if old >= 0 {
            rows.get_item(old)?.del_item(zid)?;
        }
        if new >= 0 {
            rows.get_item(new)?.set_item(zid, groups.py().None())?;
        }
        Ok(())
    }

    /// The 64-bit words of a zspage's bitmap of used slots.
    fn words(&self) -> usize {
        (1usize << self.slot_bits) / 64
    }

    /// Where the slot of allocator handle `h` lies in an arena of `arena` bytes: its part in
    /// its first frame and, if it straddles into the next frame of its zspage, the rest there.
    fn place(
        &self,
        h: u64,
        class: usize,
        frame: &[impl CellGet<u32>],
        arena: usize,
    ) -> PyResult<(Span, Option<Span>)> {
        let zid = (h >> self.slot_bits) as usize;
        let slot = (h & ((1 << self.slot_bits) - 1)) as usize;
        let size = *self
            .sizes
            .get(class)
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
            let start = (cell(frame, i, "frame index past the table")? as usize) << PAGE_SHIFT;
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
impl Slots {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        slot_bits: u32,
        max_frames: usize,
        sizes: Vec<usize>,
        slots: Vec<usize>,
        owned: Vec<Vec<usize>>,
        length_class: Vec<usize>,
        groups: usize,
        quarter: Vec<Vec<usize>>,
    ) -> PyResult<Self> {
        let classes = sizes.len();
        if slots.len() != classes || owned.len() != classes || quarter.len() != classes {
            return Err(bad(
                "one size, slot count, owned row and quarter row per class",
            ));
        }
        if groups == 0 || quarter.iter().any(|row| row.len() != groups) {
            return Err(bad("a quarter row holds a count per fullness group"));
        }
        if owned.iter().any(|row| row.len() != max_frames + 1) {
            return Err(bad("an owned row per frame count, 0 to max_frames"));
        }
        if length_class.len() != PAGE_SIZE + 1 || length_class.iter().any(|&c| c >= classes) {
            return Err(bad("a class for every zpage length, 0 to a page"));
        }
        if !(6..=16).contains(&slot_bits) {
            return Err(bad("slot bits out of range"));
        }
        Ok(Slots {
            slot_bits,
            max_frames,
            sizes,
            slots,
            owned,
            length_class,
            groups,
            quarter,
        })
    }

    /// Walk `handles` (index handles: `tag` marks those of zsmalloc `zs`, whose own handle is
    /// in the bits of `mask`) from `first` while each is one of its zpages or 0 (a miss, left
    /// as it is): each zpage's zspage gets the next tick; it is copied out of the arena onto the
    /// end of `zpages` (a bytearray), with its position in `at` and where it starts there in
    /// `starts`, when `copy` or when it straddles two frames, else only its position goes to
    /// `in_place` and its start in the arena to `offsets`.  Returns where the walk
    /// stopped (the first handle of another kind, or the end), the last tick given, and the
    /// misses met.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        py: Python<'_>,
        zs: &Bound<'_, PyAny>,
        handles: &Bound<'_, PyList>,
        first: usize,
        tag: u64,
        mask: u64,
        tick: u64,
        copy: bool,
        at: &Bound<'_, PyList>,
        zpages: &Bound<'_, PyByteArray>,
        starts: &Bound<'_, PyList>,
        in_place: &Bound<'_, PyList>,
        offsets: &Bound<'_, PyList>,
    ) -> PyResult<(usize, u64, usize)> {
        let ticks = Table::<u64>::of(zs, intern!(py, "ticks"), true)?;
        let cls = Table::<u16>::of(zs, intern!(py, "cls"), false)?;
        let frame = Table::<u32>::of(zs, intern!(py, "frame"), false)?;
        let arena = Table::<u8>::of(zs, intern!(py, "amap"), false)?;
        let ticks: MutCells<u64> = ticks.cells_mut()?;
        let cls: Cells<u16> = cls.cells();
        let frame: Cells<u32> = frame.cells();
        let whole: &[u8] = arena.values();
        let (mut tick, mut misses, mut i) = (tick, 0usize, first);
        // Every zpage of a copying walk is copied: room for a page each, from the start.
        let mut copies = Copies::new(zpages, if copy { handles.len() - i } else { 0 });
        let mut walk = || -> PyResult<()> {
            while i < handles.len() {
                let handle = u64_of(&handles.get_item(i)?)?;
                if handle == 0 {
                    misses += 1;
                    i += 1;
                    continue;
                }
                let h = handle ^ tag;
                if h > mask {
                    break; // another kind: the Python walk takes it
                }
                let zid = (h >> self.slot_bits) as usize;
                let class = cell(cls, zid, "zspage id past the table")? as usize;
                let (head, rest) = self.place(h, class, frame, whole.len())?;
                tick += 1;
                ticks
                    .get(zid)
                    .ok_or_else(|| bad("zspage id past the ticks"))?
                    .set(tick);
                match rest {
                    None if !copy => {
                        in_place.append(i)?;
                        offsets.append(head.start)?;
                    }
                    None => {
                        at.append(i)?;
                        copies.push(&[&whole[head]])?;
                    }
                    Some(rest) => {
                        at.append(i)?;
                        copies.push(&[&whole[head], &whole[rest]])?;
                    }
                }
                i += 1;
            }
            Ok(())
        };
        let walked = walk();
        copies.finish(starts)?; // what was copied, even if the walk failed
        walked.map(|()| (i, tick, misses))
    }

    /// File the zpages of `items` (a put batch's encodings) from `first` into zsmalloc `zs`
    /// while each is a zpage whose class has a hot zspage with room, or a zspage in its
    /// fullness groups to make hot (Zsmalloc._pick, fullest first), or can start a zspage
    /// with an id from `spare` (whose tables are ready; each one started goes to `born`):
    /// its slot marked, its
    /// zspage ticked and grown by frames the arena lends into `lent` (see Lent) as its slot
    /// needs them, its bytes written; `tag` | its handle goes to `handles` and `stored` to
    /// `results`.  A hot zspage whose owned frames fill while its class has room elsewhere,
    /// or that fills, goes back to the groups (Zsmalloc._regroup).  Returns where it stopped,
    /// the last tick given, the zpages and frames it added, and by how much the count of
    /// compactable classes went down (a pick takes a zspage's room out of its class's waste).
    /// A same-filled word (WORD bytes) is passed over: its position goes to `skipped`, 0 to
    /// `handles` and None to `results`, for the caller to file.
    #[allow(clippy::too_many_arguments)]
    fn file(
        &self,
        py: Python<'_>,
        zs: &Bound<'_, PyAny>,
        items: &Bound<'_, PyAny>,
        first: usize,
        tag: u64,
        tick: u64,
        stored: &Bound<'_, PyAny>,
        handles: &Bound<'_, PyList>,
        results: &Bound<'_, PyList>,
        lent: &Bound<'_, PyList>,
        spare: &Bound<'_, PyList>,
        born: &Bound<'_, PyList>,
        skipped: &Bound<'_, PyList>,
    ) -> PyResult<(usize, u64, usize, usize, usize)> {
        let groups = zs.getattr(intern!(py, "groups"))?;
        let mut lent = Lent::new(zs.getattr(intern!(py, "arena"))?, lent);
        let hot = Table::<u32>::of(zs, intern!(py, "hot"), true)?;
        let waste = Table::<u32>::of(zs, intern!(py, "waste"), true)?;
        let group = Table::<i8>::of(zs, intern!(py, "group"), true)?;
        let cls = Table::<u16>::of(zs, intern!(py, "cls"), true)?;
        let ticks = Table::<u64>::of(zs, intern!(py, "ticks"), true)?;
        let used = Table::<u64>::of(zs, intern!(py, "used"), true)?;
        let inuse = Table::<u16>::of(zs, intern!(py, "inuse"), true)?;
        let edge = Table::<u16>::of(zs, intern!(py, "edge"), true)?;
        let nframes = Table::<u8>::of(zs, intern!(py, "nframes"), true)?;
        let frame = Table::<u32>::of(zs, intern!(py, "frame"), true)?;
        let arena = Table::<u8>::of(zs, intern!(py, "amap"), true)?;
        let (hot, waste, group) = (hot.cells_mut()?, waste.cells_mut()?, group.cells_mut()?);
        let cls = cls.cells_mut()?;
        let (ticks, used) = (ticks.cells_mut()?, used.cells_mut()?);
        let (inuse, edge) = (inuse.cells_mut()?, edge.cells_mut()?);
        let (nframes, frame) = (nframes.cells_mut()?, frame.cells_mut()?);
        let (base, arena_len) = arena.raw();
        let words = self.words();
        let (mut tick, mut filed, mut taken, mut i) = (tick, 0usize, 0usize, first);
        let mut dropped = 0usize;
        // Zsmalloc._pick without a new zspage: the first zspage of the fullest group with
        // room in its owned frames, else a growable one; None if the groups have none
        let pick = |class: usize, dropped: &mut usize| -> PyResult<Option<usize>> {
            let groups = groups.downcast::<PyDict>()?;
            let Some(rows) = groups.get_item(class)? else {
                // the class's first zspage: its groups are made now, empty (as _pick does)
                let rows = (0..self.groups + 1).map(|_| PyDict::new(py));
                groups.set_item(class, PyList::new(py, rows)?)?;
                return Ok(None);
            };
            let order = (0..self.groups).rev().chain([self.groups]);
            for g in order {
                let bucket = rows.get_item(g)?;
                let bucket = bucket.downcast::<PyDict>()?;
                let Some((zid, _)) = bucket.iter().next() else {
                    continue;
                };
                bucket.del_item(&zid)?;
                let zid: usize = zid.extract()?;
                let have = cell(nframes, zid, "zspage id past the tables")? as usize;
                let owned = self.owned[class][have];
                let count = cell(inuse, zid, "zspage id past the tables")? as usize;
                group
                    .get(zid)
                    .ok_or_else(|| bad("zspage id past the tables"))?
                    .set(-1);
                let wasted = waste
                    .get(class)
                    .ok_or_else(|| bad("class past the waste table"))?;
                let (before, slots) = (wasted.get() as usize, self.slots[class]);
                let after = (before + count)
                    .checked_sub(owned)
                    .ok_or_else(|| bad("a class's waste short of its zspages' room"))?;
                wasted.set(after as u32);
                *dropped += usize::from(before >= slots && after < slots);
                edge.get(zid)
                    .ok_or_else(|| bad("zspage id past the tables"))?
                    .set(owned.min(slots) as u16);
                hot[class].set(zid as u32);
                return Ok(Some(zid));
            }
            Ok(None)
        };
        let items = Items::of(items)?;
        while i < items.len() {
            let Some(item) = items.get(i)? else {
                break; // a refusal (None): the Python path takes it
            };
            let zpage = item.bytes();
            if zpage.len() == WORD {
                // a same-filled word: the caller's to file, standing in as 0 and None till then
                skipped.append(i)?;
                handles.append(0)?;
                results.append(py.None())?;
                i += 1;
                continue;
            }
            if zpage.len() <= HEADER_SIZE || zpage.len() > PAGE_SIZE {
                break; // a raw page, or no zpage at all: the Python path's
            }
            let class = self.length_class[zpage.len()];
            let mut zid = cell(hot, class, "class past the hot table")? as usize;
            if zid == 0 {
                if let Some(picked) = pick(class, &mut dropped)? {
                    zid = picked;
                } else {
                    // a new zspage (Zsmalloc._new_zspage): an id the caller made room for, if
                    // a frame can be had for its first slot; it goes on the LRU once the
                    // call is over (`born`), as the tables cannot grow meanwhile
                    let Some(last) = spare.len().checked_sub(1) else {
                        break; // no id ready: the Python path's
                    };
                    if !lent.available()? {
                        break; // the arena is full: the Python path reclaims
                    }
                    zid = spare.get_item(last)?.extract()?;
                    spare.del_item(last)?;
                    let unused = inuse.get(zid).is_some_and(|c| c.get() == 0)
                        && cell(nframes, zid, "zspage id past the tables")? == 0
                        && cell(group, zid, "zspage id past the tables")? == -1;
                    if !unused {
                        return Err(bad("a spare zspage id in use"));
                    }
                    cls.get(zid)
                        .ok_or_else(|| bad("zspage id past the tables"))?
                        .set(class as u16);
                    hot[class].set(zid as u32);
                    born.append(zid)?;
                }
            }
            if [inuse.len(), edge.len(), nframes.len(), ticks.len()]
                .iter()
                .any(|&n| zid >= n)
            {
                return Err(bad("zspage id past the tables"));
            }
            let (size, slots) = (self.sizes[class], self.slots[class]);
            let bitmap = used
                .get(zid * words..(zid + 1) * words)
                .ok_or_else(|| bad("zspage id past the bitmaps"))?;
            let (word, bit) = bitmap
                .iter()
                .enumerate()
                .find_map(|(w, cell)| {
                    let bits = cell.get();
                    (bits != u64::MAX).then(|| (w, (!bits).trailing_zeros() as usize))
                })
                .ok_or_else(|| bad("a hot zspage with no free slot"))?;
            let slot = word * 64 + bit;
            if slot >= slots {
                return Err(bad("a hot zspage with no free slot"));
            }
            let end = (slot + 1) * size;
            let mut have = nframes[zid].get() as usize;
            if end > have << PAGE_SHIFT {
                let need = end.div_ceil(PAGE_SIZE);
                if need > self.max_frames {
                    return Err(bad("slot past its zspage"));
                }
                while have < need {
                    let Some(got) = lent.take()? else {
                        break;
                    };
                    let cell = frame
                        .get(zid * self.max_frames + have)
                        .ok_or_else(|| bad("zspage id past the frame table"))?;
                    cell.set(got);
                    have += 1;
                    taken += 1;
                    nframes[zid].set(have as u8);
                }
                if have < need {
                    break; // the arena is full: the Python path reclaims
                }
                edge[zid].set(self.owned[class][have].min(slots) as u16);
            }
            let (head, rest) = self.place(
                (zid << self.slot_bits | slot) as u64,
                class,
                frame,
                arena_len,
            )?;
            // SAFETY: `head` and `rest` lie in the arena (place() checks), which stays exported
            // and unresized while `arena` lives; nothing else writes it while the GIL is held.
            unsafe {
                let (one, two) = zpage.split_at(zpage.len().min(head.len()));
                std::ptr::copy_nonoverlapping(one.as_ptr(), base.add(head.start), one.len());
                if let Some(rest) = rest {
                    std::ptr::copy_nonoverlapping(two.as_ptr(), base.add(rest.start), two.len());
                }
            }
            tick += 1;
            ticks[zid].set(tick);
            bitmap[word].set(bitmap[word].get() | 1 << bit);
            let count = inuse[zid].get() as usize + 1;
            inuse[zid].set(count as u16);
            handles.append(tag | (zid << self.slot_bits | slot) as u64)?;
            results.append(stored)?;
            filed += 1;
            i += 1;
            if count >= edge[zid].get() as usize {
                if count < slots && cell(waste, class, "class past the waste table")? == 0 {
                    edge[zid].set(slots as u16 + 1); // stays hot; the next store grows it
                } else {
                    // Zsmalloc._regroup of the hot zspage: it cools (the class's waste stays
                    // as it is) into the group its count says
                    hot[class].set(0);
                    let owned = self.owned[class][nframes[zid].get() as usize];
                    let (new, at) = self.fullness(class, count, owned);
                    edge[zid].set(at as u16);
                    Self::move_group(&groups, class, zid, group[zid].get(), new)?;
                    group[zid].set(new);
                }
            }
        }
        Ok((i, tick, filed, taken, dropped))
    }

    /// Free the zpages of `handles` (index handles: `tag` marks those of zsmalloc `zs`, whose
    /// own handle is in the bits of `mask`) from `first` on, as Zsmalloc.free does: its slot
    /// cleared, and unless its zspage is its class's hot one, the class's waste counted and
    /// the zspage regrouped (its fullness group, a dict of zspage ids in `groups`, and its
    /// edge).  Stops, before changing anything, at a handle of another kind and at a free that
    /// empties its zspage, makes its class compactable, or finds the hot zspage of its class
    /// needing a cool (Python's cases).  A handle of kind `skip` (a tag, as `tag`) is passed
    /// over, its position listed in `skipped` for the caller to free.  Returns where it stopped
    /// and the zpages freed.
    #[allow(clippy::too_many_arguments)]
    fn free(
        &self,
        py: Python<'_>,
        zs: &Bound<'_, PyAny>,
        handles: &Bound<'_, PyList>,
        first: usize,
        tag: u64,
        mask: u64,
        skip: u64,
        skipped: &Bound<'_, PyList>,
    ) -> PyResult<(usize, usize)> {
        let cls = Table::<u16>::of(zs, intern!(py, "cls"), false)?;
        let hot = Table::<u32>::of(zs, intern!(py, "hot"), false)?;
        let nframes = Table::<u8>::of(zs, intern!(py, "nframes"), false)?;
        let group = Table::<i8>::of(zs, intern!(py, "group"), true)?;
        let groups = zs.getattr(intern!(py, "groups"))?;
        let waste = Table::<u32>::of(zs, intern!(py, "waste"), true)?;
        let used = Table::<u64>::of(zs, intern!(py, "used"), true)?;
        let inuse = Table::<u16>::of(zs, intern!(py, "inuse"), true)?;
        let edge = Table::<u16>::of(zs, intern!(py, "edge"), true)?;
        let (cls, hot, nframes, group) = (
            cls.cells(),
            hot.cells(),
            nframes.cells(),
            group.cells_mut()?,
        );
        let (waste, used) = (waste.cells_mut()?, used.cells_mut()?);
        let (inuse, edge) = (inuse.cells_mut()?, edge.cells_mut()?);
        let words = self.words();
        let (mut i, mut freed) = (first, 0usize);
        while i < handles.len() {
            let handle = u64_of(&handles.get_item(i)?)?;
            if handle ^ skip <= mask {
                skipped.append(i)?; // the caller's to free
                i += 1;
                continue;
            }
            let h = handle ^ tag;
            if h > mask {
                break; // another kind: the caller takes it
            }
            let zid = (h >> self.slot_bits) as usize;
            let slot = (h & ((1 << self.slot_bits) - 1)) as usize;
            let class = cell(cls, zid, "zspage id past the table")? as usize;
            let slots = *self
                .slots
                .get(class)
                .ok_or_else(|| bad("unknown size class"))?;
            let word = used
                .get(zid * words + slot / 64)
                .filter(|_| slot < slots)
                .ok_or_else(|| bad("slot past its zspage"))?;
            let bit = 1u64 << (slot % 64);
            if word.get() & bit == 0 {
                return Err(bad("a free of a slot not in use"));
            }
            let count = inuse
                .get(zid)
                .ok_or_else(|| bad("zspage id past the tables"))?;
            let left = count.get() as usize - 1;
            if left == 0 {
                break; // it empties its zspage: releasing it is Python's
            }
            let hot_zid = cell(hot, class, "class past the hot table")? as usize;
            let mut new_edge = None;
            if hot_zid != zid {
                let wasted = waste
                    .get(class)
                    .ok_or_else(|| bad("class past the waste table"))?;
                if wasted.get() as usize + 1 == slots {
                    break; // the class becomes worth compacting
                }
                if hot_zid != 0
                    && cell(edge, hot_zid, "hot zspage past the tables")? as usize > slots
                {
                    break; // the hot zspage must cool, as the class now has room
                }
                let owned =
                    self.owned[class][cell(nframes, zid, "zspage id past the tables")? as usize];
                let (new, at) = self.fullness(class, left, owned);
                let old = group
                    .get(zid)
                    .ok_or_else(|| bad("zspage id past the tables"))?;
                if new != old.get() {
                    Self::move_group(&groups, class, zid, old.get(), new)?;
                    old.set(new);
                }
                wasted.set(wasted.get() + 1);
                new_edge = Some(at);
            }
            word.set(word.get() & !bit);
            count.set(left as u16);
            if let Some(at) = new_edge {
                edge.get(zid)
                    .ok_or_else(|| bad("zspage id past the tables"))?
                    .set(at as u16);
            }
            freed += 1;
            i += 1;
        }
        Ok((i, freed))
    }
}

/// A walk's copies of zpages, written straight onto the end of the caller's bytearray, where
/// each starts listed in `starts`.  The bytearray is grown ahead of need (at the first copy by
/// room for `pages` pages, up to 4 MiB, else by half again) and cut to what it holds at the
/// end.  Growing it a zpage at a time costs a realloc (CPython grows one by an eighth), often a
/// copy of all so far, every few zpages; a bytes object per zpage cost its malloc and free, 8-12%
/// of the loop's time on NBD sequential reads either way.
struct Copies<'a, 'py> {
    buffer: &'a Bound<'py, PyByteArray>,
    end: usize,   // where the next copy goes: the bytearray beyond it is room, not data
    ahead: usize, // room to take at the first copy
    starts: Vec<usize>,
}

impl<'a, 'py> Copies<'a, 'py> {
    fn new(buffer: &'a Bound<'py, PyByteArray>, pages: usize) -> Self {
        Copies {
            buffer,
            end: buffer.len(),
            ahead: pages.min(1024) * PAGE_SIZE,
            starts: Vec::new(),
        }
    }

    /// Copy `parts` (one zpage's bytes) onto the end.
    fn push(&mut self, parts: &[&[u8]]) -> PyResult<()> {
        let start = self.end;
        let end = start + parts.iter().map(|p| p.len()).sum::<usize>();
        if end > self.buffer.len() {
            let room = (end + end / 2).max(start + std::mem::take(&mut self.ahead));
            self.buffer.resize(room)?;
        }
        // SAFETY: the first push of a walk always resizes the bytearray, which succeeds only
        // while none of its buffer is exported, and no Python code runs until the walk ends
        // (list appends and int reads), so nothing can export or resize it in between.
        let mut tail = unsafe { &mut self.buffer.as_bytes_mut()[start..end] };
        for part in parts {
            let (head, rest) = tail.split_at_mut(part.len());
            head.copy_from_slice(part);
            tail = rest;
        }
        self.starts.push(start);
        self.end = end;
        Ok(())
    }

    /// Cut the room not used, and list where each copy starts in `starts`.
    fn finish(self, starts: &Bound<'_, PyList>) -> PyResult<()> {
        if self.starts.is_empty() {
            return Ok(());
        }
        self.buffer.resize(self.end)?;
        for start in self.starts {
            starts.append(start)?;
        }
        Ok(())
    }
}
