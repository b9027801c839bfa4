// Borrowed views of the Python buffers the native paths read and write: the array.array tables
// of the allocators, the arena's mmap, and the pages and zpages the codec reads.
//
// pyo3's PyBuffer asks the exporter for the full buffer description (strides, suboffsets) and
// takes the GIL again to release it; with the attribute lookups of a call it cost zsmalloc's
// native file() about 4 us before its first page (measured: an empty call took 3.9 us, 2.0 once
// the names were interned, 1.x with these views), and file() is called every few pages of a put
// batch, as it stops at each decision that is Python's.  A Table asks only for what the paths
// use (a C-contiguous buffer and its item format, writable when written) and releases it
// directly: it cannot outlive the GIL token it was made under ('py, and it is not Send, so it
// cannot be taken into allow_threads; the codec's batch paths take slices of their tables'
// values() there, while the tables themselves wait outside, on their exporters' promise that
// nothing writes those buffers meanwhile).  Every table is checked as PyBuffer checks it: item
// size and format against T, alignment; a table that fails is a ValueError, never a misread.
//
// Trade-off: the checks are the caller's contract with the exporter (array, mmap); a strided
// or suboffset buffer is refused by the exporter itself, since its flags do not ask for one.
use std::cell::Cell;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::mem::{align_of, size_of, MaybeUninit};

use pyo3::buffer::{Element, ReadOnlyCell};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

/// A contiguous buffer of `T` exported by a Python object, held while the GIL is.
pub(crate) struct Table<'py, T> {
    view: Box<ffi::Py_buffer>, // boxed: an exporter may keep its address until the release
    writable: bool,
    _held: PhantomData<(Python<'py>, T)>,
}

impl<'py, T: Element> Table<'py, T> {
    /// The buffer of attribute `name` of `obj`, writable if `writable` (else read-only use).
    pub(crate) fn of(
        obj: &Bound<'py, PyAny>,
        name: &Bound<'py, PyString>,
        writable: bool,
    ) -> PyResult<Self> {
        Self::new(&obj.getattr(name)?, writable)
    }

    /// The buffer `obj` exports, writable if `writable`.
    pub(crate) fn new(obj: &Bound<'py, PyAny>, writable: bool) -> PyResult<Self> {
        let mut flags = ffi::PyBUF_ND | ffi::PyBUF_FORMAT;
        if writable {
            flags |= ffi::PyBUF_WRITABLE;
        }
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::uninit());
        // SAFETY: the view is written by PyObject_GetBuffer, which either fills it or fails.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) } == -1 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: filled by the successful call above (Box<MaybeUninit<X>> and Box<X> share a
        // layout); from here on Drop releases it.
        let view: Box<ffi::Py_buffer> = unsafe { Box::from_raw(Box::into_raw(view).cast()) };
        let table = Table {
            view,
            writable,
            _held: PhantomData,
        };
        let format = if table.view.format.is_null() {
            c"B"
        } else {
            // SAFETY: a non-null format is a NUL-terminated string owned by the view.
            unsafe { CStr::from_ptr(table.view.format) }
        };
        if table.view.itemsize as usize != size_of::<T>() || !T::is_compatible_format(format) {
            return Err(PyValueError::new_err(format!(
                "a table holds {format:?} items, not {}",
                std::any::type_name::<T>()
            )));
        }
        if table.len() > 0 && table.view.buf.align_offset(align_of::<T>()) != 0 {
            return Err(PyValueError::new_err(
                "a table is not aligned for its items",
            ));
        }
        Ok(table)
    }

    fn len(&self) -> usize {
        self.view.len as usize / size_of::<T>()
    }

    /// Where the items start: an empty buffer's pointer may be anything (array's is an
    /// unaligned static), and a slice needs an aligned one even when empty.
    fn start(&self) -> *const T {
        if self.len() == 0 {
            std::ptr::NonNull::dangling().as_ptr()
        } else {
            self.view.buf as *const T
        }
    }

    /// The items, for reading.
    pub(crate) fn cells(&self) -> &[ReadOnlyCell<T>] {
        // SAFETY: the buffer holds len() aligned items of T (checked in new; start() is aligned) and stays exported
        // for as long as self; ReadOnlyCell<T> is a transparent wrapper of T, and the GIL, held
        // meanwhile, keeps any other writer out.
        unsafe { std::slice::from_raw_parts(self.start() as *const ReadOnlyCell<T>, self.len()) }
    }

    /// The items, for reading and writing; an error unless made writable.
    pub(crate) fn cells_mut(&self) -> PyResult<&[Cell<T>]> {
        if !self.writable {
            return Err(PyValueError::new_err(
                "a table was not asked for as writable",
            ));
        }
        // SAFETY: as in cells(), and the exporter granted a writable buffer.
        Ok(unsafe { std::slice::from_raw_parts(self.start() as *const Cell<T>, self.len()) })
    }

    /// The items as plain values, for a path that only reads this table (the arena, by a walk;
    /// the codec's inputs, without the GIL): nothing writes it while the GIL is held (nor,
    /// by its exporter's promise, while the codec runs without it) and no cells_mut() of it is
    /// in use.
    pub(crate) fn values(&self) -> &[T] {
        // SAFETY: as in cells(); the caller writes through no other view of it meanwhile.
        unsafe { std::slice::from_raw_parts(self.start(), self.len()) }
    }

    /// Start and length in bytes of the buffer (the arena's base, for its copies).
    pub(crate) fn raw(&self) -> (*mut u8, usize) {
        (self.view.buf as *mut u8, self.view.len as usize)
    }
}

impl<T> Table<'_, T> {
    /// This table's export, kept past its GIL token (a codec job's input, read by a worker
    /// without the GIL; native/pool.rs).
    pub(crate) fn hold(self) -> Held {
        let table = std::mem::ManuallyDrop::new(self);
        // SAFETY: the box is moved out of a table that is never dropped, so released once.
        Held {
            _view: unsafe { std::ptr::read(&table.view) },
        }
    }
}

/// A buffer export that outlives its GIL token: released, as a Table's is, when dropped, which
/// its owner does only with the GIL held (native/pool.rs keeps them so).
pub(crate) struct Held {
    _view: Box<ffi::Py_buffer>,
}

// SAFETY: a Held is moved between threads but only dropped where the GIL is held (above); the
// buffer behind it is read through addresses its owner took, not through it.
unsafe impl Send for Held {}
unsafe impl Sync for Held {}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: filled by PyObject_GetBuffer, released once, with the GIL held (see Held).
        unsafe { ffi::PyBuffer_Release(&mut *self._view) }
    }
}

impl<T> Drop for Table<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer and is released once; the GIL is
        // held, as the 'py token this table cannot outlive says.
        unsafe { ffi::PyBuffer_Release(&mut *self.view) }
    }
}
