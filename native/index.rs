// The batch paths of a pool's page index (ramster/zcache/index.py) in native code.
//
// PageIndex maps (object id, page index) to a handle through a dict of objects, each a dict of
// chunk numbers to arrays of 64 handles ('q').  Its batch lookups and updates walked the keys
// in Python, two dict lookups and an array access a key: on an NBD write that was a seventh of
// the event loop's time, for keys that come in runs of one chunk (a block device's sequential
// blocks, a swap device's clusters).  Here a batch is one call: the chunk of the previous key is
// kept while keys stay in it, so a run costs a key's tuple and one array store per key.
//
// The structure and its rules stay index.py's (it builds chunks from its empty one and reads
// the same dicts): a chunk left all zeros is dropped, and an object left without chunks; this
// is checked once a run of keys leaves a chunk it zeroed a slot of, which leaves the same
// index as checking at every such slot (a key that comes back to a dropped chunk finds none).
// The GIL is held throughout: these are the engine's own tables.
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::key_of;
use crate::table::Table;

const CHUNK_BITS: u32 = 6;
const CHUNK: usize = 1 << CHUNK_BITS;

/// The chunk a run of keys is in: whose, which, and its handles.
struct Run<'py> {
    oid: u64,
    cno: u64,
    obj: Bound<'py, PyDict>,
    handles: Table<'py, i64>,
    zeroed: bool, // a slot of it went to 0 in this run: drop it if it is all zeros
}

/// Object id and page index of a key.
fn key(item: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
    let (oid, index) = key_of(item)?;
    Ok((oid, u64::from(index)))
}

/// The chunk of `cno` in `obj`, if there is one.
fn chunk_of<'py>(obj: &Bound<'py, PyDict>, cno: u64) -> PyResult<Option<Table<'py, i64>>> {
    match obj.get_item(cno)? {
        Some(chunk) => Ok(Some(chunk_table(&chunk)?)),
        None => Ok(None),
    }
}

fn chunk_table<'py>(chunk: &Bound<'py, PyAny>) -> PyResult<Table<'py, i64>> {
    let table = Table::new(chunk, true)?;
    if table.cells_mut()?.len() != CHUNK {
        return Err(PyValueError::new_err("an index chunk holds 64 handles"));
    }
    Ok(table)
}

/// Drop the run's chunk if it holds no handle any more, and its object if that was its last.
fn close(objects: &Bound<'_, PyDict>, run: Run<'_>) -> PyResult<()> {
    if run.zeroed && run.handles.cells_mut()?.iter().all(|h| h.get() == 0) {
        run.obj.del_item(run.cno)?;
        if run.obj.is_empty() {
            objects.del_item(run.oid)?;
        }
    }
    Ok(())
}

/// Handles of `keys` (0 where absent), in order.
#[pyfunction]
pub(crate) fn index_get<'py>(
    objects: &Bound<'py, PyDict>,
    keys: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyList>> {
    let py = objects.py();
    let out = PyList::empty(py);
    // the chunk of the previous key: (oid, cno, its handles if it exists)
    let mut last: Option<(u64, u64, Option<Table<'py, i64>>)> = None;
    for item in keys.iter() {
        let (oid, index) = key(&item)?;
        let cno = index >> CHUNK_BITS;
        if !matches!(&last, Some((o, c, _)) if *o == oid && *c == cno) {
            let chunk = match objects.get_item(oid)? {
                Some(obj) => chunk_of(obj.downcast::<PyDict>()?, cno)?,
                None => None,
            };
            last = Some((oid, cno, chunk));
        }
        let handle = match &last {
            Some((_, _, Some(chunk))) => chunk.cells()[index as usize % CHUNK].get(),
            _ => 0,
        };
        out.append(handle)?;
    }
    Ok(out)
}

/// File `handles` under `keys` in order (None: 0 for every key, which removes it); a key's old
/// handle is replaced.  Keys and handles are all read before anything changes.  Returns the
/// old handles (only the non-zero ones if `displaced_only`) and the change in the number of
/// keys held.
#[pyfunction]
#[pyo3(signature = (objects, keys, handles, empty, displaced_only))]
pub(crate) fn index_update<'py>(
    objects: &Bound<'py, PyDict>,
    keys: &Bound<'py, PyList>,
    handles: Option<&Bound<'py, PyList>>,
    empty: &Bound<'py, PyAny>,
    displaced_only: bool,
) -> PyResult<(Bound<'py, PyList>, i64)> {
    let py = objects.py();
    if handles.is_some_and(|h| h.len() != keys.len()) {
        return Err(PyValueError::new_err("as many handles as keys"));
    }
    // every key and handle first: a malformed one changes nothing
    let mut parsed = Vec::with_capacity(keys.len());
    for item in keys.iter() {
        parsed.push(key(&item)?);
    }
    let news: Vec<i64> = match handles {
        Some(h) => h.extract()?,
        None => vec![0; parsed.len()],
    };
    let out = PyList::empty(py);
    let mut delta = 0i64;
    let mut run: Option<Run<'py>> = None;
    let mut absent: Option<(u64, u64)> = None; // a chunk found missing: removals there are no-ops
    for ((oid, index), new) in parsed.into_iter().zip(news) {
        let cno = index >> CHUNK_BITS;
        if new == 0 && absent == Some((oid, cno)) {
            if !displaced_only {
                out.append(0)?;
            }
            continue;
        }
        if !matches!(&run, Some(r) if r.oid == oid && r.cno == cno) {
            if let Some(done) = run.take() {
                close(objects, done)?;
            }
            let obj = match objects.get_item(oid)? {
                Some(obj) => Some(obj.downcast_into::<PyDict>()?),
                None if new != 0 => {
                    let obj = PyDict::new(py);
                    objects.set_item(oid, &obj)?;
                    Some(obj)
                }
                None => None,
            };
            if obj.is_none() {
                absent = Some((oid, cno));
            }
            if let Some(obj) = obj {
                let handles = match chunk_of(&obj, cno)? {
                    Some(chunk) => Some(chunk),
                    None if new != 0 => {
                        let chunk = empty.call_method0(intern!(py, "__copy__"))?;
                        obj.set_item(cno, &chunk)?;
                        absent = None;
                        Some(chunk_table(&chunk)?)
                    }
                    None => None,
                };
                if handles.is_none() {
                    absent = Some((oid, cno));
                }
                run = handles.map(|handles| Run {
                    oid,
                    cno,
                    obj,
                    handles,
                    zeroed: false,
                });
            }
        }
        let old = match &mut run {
            Some(r) => {
                let slot = &r.handles.cells_mut()?[index as usize % CHUNK];
                let old = slot.get();
                slot.set(new);
                r.zeroed |= new == 0 && old != 0;
                old
            }
            None => 0, // absent, and removed: nothing to do
        };
        delta += i64::from(new != 0) - i64::from(old != 0);
        if !displaced_only || old != 0 {
            out.append(old)?;
        }
    }
    if let Some(done) = run {
        close(objects, done)?;
    }
    Ok((out, delta))
}
