// ramster.zcache._codec.CodecPool: codec worker threads that never take the GIL.
//
// A node's codec workers encode put chunks and open get chunks beside its event loop.  As
// Python threads (a ThreadPoolExecutor running encode_pages), each chunk cost a worker three or
// four takes of the GIL (to leave its queue, to make the chunk's bytes objects, to resolve its
// future), and each take waited while the loop ran Python: measured on NBD sequential writes,
// a worker spent a third of its time waiting for the GIL, and both cores sat idle a fifth of
// the time.  Here a worker is a native thread: a job's inputs are taken (their buffers
// exported, a get's pages made) by submit with the GIL, on the loop; the worker codes them with
// plain pointers and files its output in a done list, and writes one byte to a socket when that
// list was empty; the loop, woken by that socket (asyncio's add_reader on fileno()), takes the
// finished jobs with finished(), which makes their results (an encode's Zpages, which keeps the
// worker's buffer, native/zpages.rs; an open's pages, as open_zpages_at gives them) and releases
// their buffers.
//
// Safety rests on two rules: a job's buffers stay exported, and its page objects alive, in
// `pending` until finished() or close() has seen the worker let go of them; and they are
// released only with the GIL (every method holds it).  The exporters promise, as for
// encode_pages, that nothing writes a page while it is being coded.
//
// A pool's workers may run at a lower priority than the process (`nice`, set by each worker on
// itself): the loop that feeds them then gets a core first when both want one
// (node/codecworkers.py says why and what it measured).
//
// Trade-off: a job that nobody waits for any more still runs to the end (a cancelled batch's
// chunks are few: a batch keeps two with the workers).
// A worker that panics fails its job (finished() gives a RuntimeError for it), not the node.
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::table::Held;
use crate::zpages::Zpages;
use crate::{
    blank_pages, bytes_of, encode_all, open_into, opened_pages, page_slices, page_tables,
    zpages_at, Encoded, Key, Keys, PAGE_SIZE,
};

/// A job's work, on addresses of buffers that `pending` keeps exported meanwhile.
enum Work {
    Encode {
        keys: Vec<Key>,
        pages: Vec<usize>,
        threshold: usize,
        store_raw: bool,
    },
    Open {
        keys: Vec<Key>,
        zpages: Vec<(usize, usize)>,
        targets: Vec<usize>,
    },
}

enum Output {
    Encoded(Vec<u8>, Vec<Encoded>),
    Opened(Vec<Result<(), String>>),
    Panicked,
}

/// What a job holds until it is finished: its exported inputs and, for an open, its pages.
struct Pending {
    _inputs: Vec<Held>,
    pages: Vec<Py<PyBytes>>,
}

/// The finished jobs, and the socket that tells the loop there are some.
struct Done {
    jobs: Mutex<Vec<(u64, Output)>>,
    signal: UnixStream,
    signalled: AtomicBool,
    closed: AtomicBool, // the pool is closing: queued jobs are dropped, not run
}

impl Done {
    fn finish(&self, id: u64, output: Output) {
        self.jobs.lock().expect("done list").push((id, output));
        if !self.signalled.swap(true, Ordering::SeqCst) {
            // A full socket already holds a wake-up, which is all a byte is.
            let _ = (&self.signal).write(&[1]);
        }
    }
}

fn run(work: &Work) -> Output {
    match work {
        Work::Encode {
            keys,
            pages,
            threshold,
            store_raw,
        } => {
            // SAFETY: each address starts a page inside a buffer the job holds exported (every
            // buffer checked at submit to be whole pages).
            let pages = pages
                .iter()
                .map(|&page| unsafe { std::slice::from_raw_parts(page as *const u8, PAGE_SIZE) });
            let (scratch, spans) = encode_all(pages, keys, *threshold, *store_raw);
            Output::Encoded(scratch, spans)
        }
        Work::Open {
            keys,
            zpages,
            targets,
        } => {
            // SAFETY: buffers of `len` bytes held exported by the job; the targets are its
            // blank pages, which only this job writes.
            let zpages = zpages
                .iter()
                .map(|&(at, len)| unsafe { std::slice::from_raw_parts(at as *const u8, len) });
            Output::Opened(open_into(zpages, keys, targets))
        }
    }
}

fn serve(
    jobs: Arc<Mutex<mpsc::Receiver<(u64, Work)>>>,
    done: Arc<Done>,
    named: Arc<Barrier>,
    nice: i32,
) {
    if nice != 0 {
        // SAFETY: a plain syscall on this thread's own id.  If it fails (a seccomp filter, say),
        // the thread keeps the process's priority: it only competes more with the loop.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    }
    named.wait(); // the thread has its name: the pool's maker may go on
    loop {
        let next = jobs.lock().expect("job queue").recv();
        let Ok((id, work)) = next else { return }; // the pool closed
        if done.closed.load(Ordering::SeqCst) {
            return;
        }
        let output = catch_unwind(AssertUnwindSafe(|| run(&work))).unwrap_or(Output::Panicked);
        done.finish(id, output);
    }
}

/// Native codec worker threads; jobs are submitted and finished on one thread, the loop's.
#[pyclass]
pub struct CodecPool {
    jobs: Option<mpsc::Sender<(u64, Work)>>,
    threads: Vec<JoinHandle<()>>,
    done: Arc<Done>,
    wake: UnixStream,
    pending: HashMap<u64, Pending>,
    next: u64,
}

impl CodecPool {
    fn submit(&mut self, work: Work, pending: Pending) -> PyResult<u64> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| PyRuntimeError::new_err("the codec pool is closed"))?;
        let id = self.next;
        self.next += 1;
        self.pending.insert(id, pending);
        if jobs.send((id, work)).is_err() {
            self.pending.remove(&id);
            return Err(PyRuntimeError::new_err("the codec workers are gone"));
        }
        Ok(id)
    }

    fn shut(&mut self, py: Python<'_>) {
        self.done.closed.store(true, Ordering::SeqCst);
        self.jobs = None;
        let threads = std::mem::take(&mut self.threads);
        py.allow_threads(|| {
            for thread in threads {
                let _ = thread.join();
            }
        });
        self.done.jobs.lock().expect("done list").clear();
        self.pending.clear();
    }
}

#[pymethods]
impl CodecPool {
    /// `threads` workers, their threads named `name` + their number, each `nice` above the
    /// process's nice value (lower priority: the scheduler runs the loop first).
    #[new]
    #[pyo3(signature = (threads, name, nice = 0))]
    fn new(threads: usize, name: &str, nice: i32) -> PyResult<Self> {
        if threads == 0 {
            return Err(PyValueError::new_err("a codec pool needs a thread"));
        }
        let (wake, signal) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        signal.set_nonblocking(true)?;
        let done = Arc::new(Done {
            jobs: Mutex::new(Vec::new()),
            signal,
            signalled: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let (sender, receiver) = mpsc::channel();
        let receiver = Arc::new(Mutex::new(receiver));
        // Made only once every thread carries its name, which /proc shows (node/threadcpu.py
        // gives a thread its role when it first sees it).
        let named = Arc::new(Barrier::new(threads + 1));
        let threads = (0..threads)
            .map(|n| {
                let (jobs, done, named) = (receiver.clone(), done.clone(), named.clone());
                std::thread::Builder::new()
                    .name(format!("{name}{n}"))
                    .spawn(move || serve(jobs, done, named, nice))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        named.wait();
        Ok(CodecPool {
            jobs: Some(sender),
            threads,
            done,
            wake,
            pending: HashMap::new(),
            next: 0,
        })
    }

    /// The descriptor that turns readable when jobs have finished.
    fn fileno(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    /// Submit encode_pages(keys, pages, threshold, store_raw); the job's id.
    fn encode(
        &mut self,
        keys: Keys,
        pages: Vec<Bound<'_, PyAny>>,
        threshold: usize,
        store_raw: bool,
    ) -> PyResult<u64> {
        let tables = page_tables(keys.len(), &pages)?;
        let addresses = page_slices(&tables)
            .map(|page| page.as_ptr() as usize)
            .collect();
        let inputs = tables.into_iter().map(|t| t.hold()).collect();
        let work = Work::Encode {
            keys: keys.0,
            pages: addresses,
            threshold,
            store_raw,
        };
        let pending = Pending {
            _inputs: inputs,
            pages: Vec::new(),
        };
        self.submit(work, pending)
    }

    /// Submit open_zpages_at(keys, buffer, offsets); the job's id.
    fn open(
        &mut self,
        py: Python<'_>,
        keys: Keys,
        buffer: Bound<'_, PyAny>,
        offsets: Vec<usize>,
    ) -> PyResult<u64> {
        let table = bytes_of(&buffer, "buffer", 0)?;
        let spans = zpages_at(keys.len(), table.values(), &offsets)?
            .iter()
            .map(|z| (z.as_ptr() as usize, z.len()))
            .collect();
        let inputs = vec![table.hold()];
        let (pages, targets) = blank_pages(py, keys.len())?;
        let pages = pages.into_iter().map(Bound::unbind).collect();
        let work = Work::Open {
            keys: keys.0,
            zpages: spans,
            targets,
        };
        self.submit(
            work,
            Pending {
                _inputs: inputs,
                pages,
            },
        )
    }

    /// The jobs finished since the last call, as (id, result): an encode's Zpages (a sequence
    /// of bytes or None, as encode_pages' list), an open's list of bytes or str (as
    /// open_zpages_at), or a RuntimeError if its worker failed.
    fn finished<'py>(&mut self, py: Python<'py>) -> PyResult<Vec<(u64, Bound<'py, PyAny>)>> {
        let mut sink = [0u8; 64];
        loop {
            match (&self.wake).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(err.into()),
            }
        }
        self.done.signalled.store(false, Ordering::SeqCst);
        let finished = std::mem::take(&mut *self.done.jobs.lock().expect("done list"));
        let mut out = Vec::with_capacity(finished.len());
        for (id, output) in finished {
            let pending = self
                .pending
                .remove(&id)
                .expect("a finished job was pending");
            out.push((id, result(py, output, pending)?));
        }
        Ok(out)
    }

    /// Jobs submitted and not yet taken by finished().
    fn __len__(&self) -> usize {
        self.pending.len()
    }

    /// Stop the workers once the jobs they hold are done (queued ones are dropped) and release
    /// every job's buffers; submit fails from then on.  Idempotent.
    fn close(&mut self, py: Python<'_>) {
        self.shut(py);
    }
}

impl Drop for CodecPool {
    fn drop(&mut self) {
        // A pool is dropped by Python, which holds the GIL: the buffers go after the threads.
        Python::with_gil(|py| self.shut(py));
    }
}

fn result<'py>(py: Python<'py>, output: Output, pending: Pending) -> PyResult<Bound<'py, PyAny>> {
    Ok(match output {
        Output::Encoded(scratch, spans) => Bound::new(py, Zpages::new(scratch, spans))?.into_any(),
        Output::Opened(results) => {
            let pages = pending
                .pages
                .into_iter()
                .map(|p| p.into_bound(py))
                .collect();
            opened_pages(py, pages, results)
                .into_pyobject(py)?
                .into_any()
        }
        Output::Panicked => PyRuntimeError::new_err("a codec worker panicked")
            .into_value(py)
            .into_bound(py)
            .into_any(),
    })
}
