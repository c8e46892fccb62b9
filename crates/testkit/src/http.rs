//! A small HTTP/1.1 file server on 127.0.0.1 for download tests: serves byte bodies by path,
//! answers `Range: bytes=A-[B]` with 206 (as GitHub and the Hugging Face hub do), 404s unknown
//! paths, can break a transfer off midway once, and records every request so a test can check
//! what the client asked for. Stopped (port closed) when dropped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the server answers for one path.
#[derive(Debug, Clone, Default)]
pub struct Route {
    pub body: Vec<u8>,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Break the connection off after this many body bytes, in the first response whose body is
    /// longer (then serve normally).
    pub drop_after: Option<usize>,
    /// Ignore `Range` and always send the whole body with 200.
    pub no_ranges: bool,
}

impl Route {
    /// A plain file.
    pub fn file(body: Vec<u8>) -> Self {
        Self {
            body,
            ..Self::default()
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    requests: Vec<Request>,
}

/// The running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let st = st.clone();
                    std::thread::spawn(move || handle(conn, &st));
                }
            }
        });
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` (an `HF_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint())
    }

    /// Serves `route` at `path`.
    pub fn route(&self, path: &str, route: Route) {
        self.lock().routes.insert(path.to_string(), route);
    }

    /// Changes the route at `path` (which must exist).
    pub fn update_route(&self, path: &str, change: impl FnOnce(&mut Route)) {
        change(self.lock().routes.get_mut(path).expect("route exists"));
    }

    /// Serves a hub file as huggingface.co does for `GET /{repo}/resolve/main/{file}`: with the
    /// commit and the LFS etag (normally the file's SHA-256) hf-hub reads from the answer to
    /// its `Range: bytes=0-0` probe.
    pub fn hub_file(&self, repo: &str, file: &str, body: Vec<u8>, etag: &str) {
        let headers = vec![
            (
                "x-repo-commit".into(),
                "0123456789abcdef0123456789abcdef01234567".into(),
            ),
            ("x-linked-etag".into(), format!("\"{etag}\"")),
            ("etag".into(), "\"0000\"".into()),
        ];
        self.route(
            &format!("/{repo}/resolve/main/{file}"),
            Route {
                body,
                headers,
                ..Route::default()
            },
        );
    }

    /// The requests received for `path`, in order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(conn: TcpStream, state: &Mutex<State>) {
    let Some(request) = read_request(&conn) else {
        return;
    };
    let route = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests.push(request.clone());
        s.routes.get(&request.path).cloned()
    };
    let Some(route) = route else {
        let _ = respond(&conn, "404 Not Found", &[], b"not found", None);
        return;
    };
    let len = route.body.len();
    let range = request
        .header("Range")
        .filter(|_| !route.no_ranges)
        .and_then(parse_range);
    let (status, body, mut headers) = match range {
        Some((start, _)) if start >= len => (
            "416 Range Not Satisfiable",
            &[][..],
            vec![("Content-Range".to_string(), format!("bytes */{len}"))],
        ),
        Some((start, end)) => {
            let end = end.map_or(len - 1, |e| e.min(len - 1));
            (
                "206 Partial Content",
                &route.body[start..=end],
                vec![(
                    "Content-Range".to_string(),
                    format!("bytes {start}-{end}/{len}"),
                )],
            )
        }
        None => ("200 OK", &route.body[..], Vec::new()),
    };
    headers.extend(route.headers.iter().cloned());
    // The break-off happens once: the first response long enough for it.
    let cut = route.drop_after.filter(|&n| body.len() > n);
    if cut.is_some() {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = s.routes.get_mut(&request.path) {
            r.drop_after = None;
        }
    }
    let _ = respond(&conn, status, &headers, body, cut);
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line
        .split_whitespace()
        .nth(1)?
        .split('?')
        .next()?
        .to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(Request { path, headers })
}

/// `bytes=A-` or `bytes=A-B`.
fn parse_range(value: &str) -> Option<(usize, Option<usize>)> {
    let (a, b) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    let end = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a.trim().parse().ok()?, end))
}

fn respond(
    mut conn: &TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    cut: Option<usize>,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    match cut {
        Some(n) => {
            conn.write_all(&body[..n])?;
            conn.flush()?;
            conn.shutdown(Shutdown::Both)
        }
        None => {
            conn.write_all(body)?;
            conn.flush()
        }
    }
}
