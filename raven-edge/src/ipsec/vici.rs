//! A small client of charon's VICI protocol (the versatile IKE control
//! interface) over its Unix socket: the wire codec, plain requests and
//! streamed ones (`list-sas`, `list-conns`), and `success` checking —
//! charon answers a failed command with `success = no` and an `errmsg`,
//! which [`Client::call`] turns into an error.
//!
//! Wire format: every packet is a 32-bit big-endian length and then the
//! packet: a type byte, for named types a length-prefixed name, then a
//! message of elements (section start/end, key = value, list start, item,
//! list end), strings length-prefixed (8 bits for names, 16 for values).

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Most bytes of one packet charon sends (its own limit is 512 KiB).
const MAX_PACKET: usize = 512 * 1024;

/// One value of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(Vec<u8>),
    List(Vec<Vec<u8>>),
    Section(Message),
}

/// A VICI message: named values in order (names repeat in no message raven
/// builds; on reading, the first one wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message(pub Vec<(String, Value)>);

impl Message {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds `name = value`.
    pub fn kv(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.0
            .push((name.to_owned(), Value::Str(value.as_ref().to_vec())));
        self
    }
    /// Adds a list.
    pub fn list<I, S>(mut self, name: &str, items: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        self.0.push((
            name.to_owned(),
            Value::List(items.into_iter().map(|s| s.as_ref().to_vec()).collect()),
        ));
        self
    }
    /// Adds a section.
    pub fn section(mut self, name: &str, body: Message) -> Self {
        self.0.push((name.to_owned(), Value::Section(body)));
        self
    }
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    /// A string value, lossily as UTF-8.
    pub fn str(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            Value::Str(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
    /// A string value as a number.
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.str(name)?.parse().ok()
    }
    pub fn sec(&self, name: &str) -> Option<&Message> {
        match self.get(name)? {
            Value::Section(m) => Some(m),
            _ => None,
        }
    }
    /// The items of a list value, lossily as UTF-8.
    pub fn strs(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(Value::List(items)) => items
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
            _ => Vec::new(),
        }
    }
    /// The sections of this message, by name (list-sas and list-conns put
    /// each SA or connection in a section named after it).
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Message)> {
        self.0.iter().filter_map(|(n, v)| match v {
            Value::Section(m) => Some((n.as_str(), m)),
            _ => None,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ViciError> {
        for (name, value) in &self.0 {
            match value {
                Value::Str(v) => {
                    out.push(KEY_VALUE);
                    put_name(out, name)?;
                    put_value(out, v)?;
                }
                Value::List(items) => {
                    out.push(LIST_START);
                    put_name(out, name)?;
                    for v in items {
                        out.push(LIST_ITEM);
                        put_value(out, v)?;
                    }
                    out.push(LIST_END);
                }
                Value::Section(m) => {
                    out.push(SECTION_START);
                    put_name(out, name)?;
                    m.encode(out)?;
                    out.push(SECTION_END);
                }
            }
        }
        Ok(())
    }

    pub fn decode(mut buf: &[u8]) -> Result<Self, ViciError> {
        let mut stack: Vec<(String, Message)> = vec![(String::new(), Message::new())];
        let mut list: Option<(String, Vec<Vec<u8>>)> = None;
        while let Some((&ty, rest)) = buf.split_first() {
            buf = rest;
            let top = &mut stack.last_mut().ok_or(ViciError::Malformed("stack"))?.1;
            match (ty, &mut list) {
                (LIST_ITEM, Some((_, items))) => items.push(take_value(&mut buf)?),
                (LIST_END, Some(_)) => {
                    if let Some((name, items)) = list.take() {
                        top.0.push((name, Value::List(items)));
                    }
                }
                (_, Some(_)) => return Err(ViciError::Malformed("element inside a list")),
                (SECTION_START, None) => {
                    let name = take_name(&mut buf)?;
                    stack.push((name, Message::new()));
                }
                (SECTION_END, None) => {
                    if stack.len() < 2 {
                        return Err(ViciError::Malformed("unbalanced section end"));
                    }
                    if let Some((name, m)) = stack.pop()
                        && let Some((_, parent)) = stack.last_mut()
                    {
                        parent.0.push((name, Value::Section(m)));
                    }
                }
                (KEY_VALUE, None) => {
                    let name = take_name(&mut buf)?;
                    let v = take_value(&mut buf)?;
                    top.0.push((name, Value::Str(v)));
                }
                (LIST_START, None) => list = Some((take_name(&mut buf)?, Vec::new())),
                _ => return Err(ViciError::Malformed("unknown element type")),
            }
        }
        if stack.len() != 1 || list.is_some() {
            return Err(ViciError::Malformed(
                "message ends inside a section or list",
            ));
        }
        Ok(stack.pop().map(|(_, m)| m).unwrap_or_default())
    }
}

const SECTION_START: u8 = 1;
const SECTION_END: u8 = 2;
const KEY_VALUE: u8 = 3;
const LIST_START: u8 = 4;
const LIST_ITEM: u8 = 5;
const LIST_END: u8 = 6;

const CMD_REQUEST: u8 = 0;
const CMD_RESPONSE: u8 = 1;
const CMD_UNKNOWN: u8 = 2;
const EVENT_REGISTER: u8 = 3;
const EVENT_UNREGISTER: u8 = 4;
const EVENT_CONFIRM: u8 = 5;
const EVENT_UNKNOWN: u8 = 6;
const EVENT: u8 = 7;

fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), ViciError> {
    let len = u8::try_from(name.len()).map_err(|_| ViciError::TooLong(name.to_owned()))?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_value(out: &mut Vec<u8>, v: &[u8]) -> Result<(), ViciError> {
    let len =
        u16::try_from(v.len()).map_err(|_| ViciError::TooLong(format!("{} bytes", v.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], ViciError> {
    if buf.len() < n {
        return Err(ViciError::Malformed("truncated"));
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

fn take_name(buf: &mut &[u8]) -> Result<String, ViciError> {
    let n = take(buf, 1)?[0] as usize;
    Ok(String::from_utf8_lossy(take(buf, n)?).into_owned())
}

fn take_value(buf: &mut &[u8]) -> Result<Vec<u8>, ViciError> {
    let l = take(buf, 2)?;
    let n = u16::from_be_bytes([l[0], l[1]]) as usize;
    Ok(take(buf, n)?.to_vec())
}

#[derive(Debug, thiserror::Error)]
pub enum ViciError {
    #[error("VICI socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed VICI packet: {0}")]
    Malformed(&'static str),
    #[error("VICI name or value too long: {0}")]
    TooLong(String),
    #[error("charon does not know the VICI command or event {0:?}")]
    Unknown(String),
    #[error("charon refused {command}: {message}")]
    Failed { command: String, message: String },
}

/// A connection to charon's VICI socket. Requests are answered in order;
/// one request at a time.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    stream: UnixStream,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ViciError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ViciError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            stream,
        })
    }

    fn io(&self, source: std::io::Error) -> ViciError {
        ViciError::Io {
            path: self.path.clone(),
            source,
        }
    }

    async fn send(&mut self, ty: u8, name: &str, msg: &Message) -> Result<(), ViciError> {
        let mut body = vec![ty];
        put_name(&mut body, name)?;
        msg.encode(&mut body)?;
        let len = u32::try_from(body.len()).map_err(|_| ViciError::TooLong(name.to_owned()))?;
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        self.stream.write_all(&packet).await.map_err(|e| self.io(e))
    }

    /// Reads one packet: its type, name (for events) and message.
    async fn recv(&mut self) -> Result<(u8, String, Message), ViciError> {
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .await
            .map_err(|e| self.io(e))?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(ViciError::Malformed("packet length"));
        }
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| self.io(e))?;
        let mut rest = &buf[1..];
        let ty = buf[0];
        let name = if ty == EVENT {
            take_name(&mut rest)?
        } else {
            String::new()
        };
        Ok((ty, name, Message::decode(rest)?))
    }

    /// Sends a command and returns charon's answer as it is.
    pub async fn request(&mut self, command: &str, msg: &Message) -> Result<Message, ViciError> {
        self.send(CMD_REQUEST, command, msg).await?;
        loop {
            match self.recv().await? {
                (CMD_RESPONSE, _, m) => return Ok(m),
                (CMD_UNKNOWN, _, _) => return Err(ViciError::Unknown(command.to_owned())),
                // Log events of a waiting `initiate` (none are registered).
                (EVENT, _, _) => continue,
                _ => return Err(ViciError::Malformed("unexpected packet")),
            }
        }
    }

    /// Sends a command whose answer carries `success`: `no` becomes
    /// [`ViciError::Failed`] with charon's `errmsg`.
    pub async fn call(&mut self, command: &str, msg: &Message) -> Result<Message, ViciError> {
        let resp = self.request(command, msg).await?;
        check_success(command, resp)
    }

    /// Sends a command that streams its results as `event` packets (like
    /// `list-sas` with `list-sa`), returning them and the final answer.
    pub async fn stream(
        &mut self,
        command: &str,
        event: &str,
        msg: &Message,
    ) -> Result<Vec<Message>, ViciError> {
        self.send(EVENT_REGISTER, event, &Message::new()).await?;
        self.confirm(event).await?;
        self.send(CMD_REQUEST, command, msg).await?;
        let mut events = Vec::new();
        let result = loop {
            match self.recv().await? {
                (EVENT, name, m) if name == event => events.push(m),
                (EVENT, _, _) => continue,
                (CMD_RESPONSE, _, m) => break Ok(m),
                (CMD_UNKNOWN, _, _) => break Err(ViciError::Unknown(command.to_owned())),
                _ => break Err(ViciError::Malformed("unexpected packet")),
            }
        };
        self.send(EVENT_UNREGISTER, event, &Message::new()).await?;
        self.confirm(event).await?;
        // list-* answers carry no `success`; a failure has one set to `no`.
        if let Ok(m) = &result
            && m.str("success").as_deref() == Some("no")
        {
            check_success(command, m.clone())?;
        }
        result.map(|_| events)
    }

    async fn confirm(&mut self, event: &str) -> Result<(), ViciError> {
        loop {
            match self.recv().await? {
                (EVENT_CONFIRM, _, _) => return Ok(()),
                (EVENT_UNKNOWN, _, _) => return Err(ViciError::Unknown(event.to_owned())),
                (EVENT, _, _) => continue,
                _ => return Err(ViciError::Malformed("unexpected packet")),
            }
        }
    }
}

/// `success = yes` or an error with charon's `errmsg`.
pub fn check_success(command: &str, resp: Message) -> Result<Message, ViciError> {
    if resp.str("success").as_deref() == Some("yes") {
        Ok(resp)
    } else {
        Err(ViciError::Failed {
            command: command.to_owned(),
            message: resp
                .str("errmsg")
                .unwrap_or_else(|| "no success and no errmsg".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message::new().section(
            "raven-b",
            Message::new()
                .kv("version", "2")
                .list("local_addrs", ["10.0.0.1", "10.0.0.2"])
                .list("empty", Vec::<&str>::new())
                .section(
                    "children",
                    Message::new().section("raven-b", Message::new()),
                ),
        )
    }

    #[test]
    fn message_round_trips_through_the_wire_format() {
        let m = sample();
        let mut buf = Vec::new();
        m.encode(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Message::decode(&buf).unwrap_or_default(), m);
        // Known bytes of the start: section "raven-b", key "version" = "2".
        assert_eq!(&buf[..9], &[1, 7, b'r', b'a', b'v', b'e', b'n', b'-', b'b']);
        assert_eq!(
            &buf[9..21],
            &[3, 7, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0, 1, b'2']
        );
    }

    #[test]
    fn truncated_or_unbalanced_messages_are_errors_not_panics() {
        let mut buf = Vec::new();
        sample().encode(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        for cut in 0..buf.len() {
            // Every strict prefix is either a shorter valid message (it ends
            // on an element boundary at depth 0, only the empty one here) or
            // an error.
            if let Ok(m) = Message::decode(&buf[..cut]) {
                assert_eq!(m, Message::new(), "prefix {cut}");
            }
        }
        assert!(Message::decode(&[SECTION_END]).is_err());
        assert!(Message::decode(&[LIST_ITEM, 0, 0]).is_err());
        assert!(Message::decode(&[9]).is_err());
    }

    #[test]
    fn too_long_name_is_refused() {
        let m = Message::new().kv(&"x".repeat(300), "v");
        assert!(matches!(
            m.encode(&mut Vec::new()),
            Err(ViciError::TooLong(_))
        ));
    }

    #[test]
    fn success_no_becomes_an_error_with_charons_message() {
        let err = check_success(
            "load-conn",
            Message::new()
                .kv("success", "no")
                .kv("errmsg", "parsing failed"),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert_eq!(err, "charon refused load-conn: parsing failed");
        assert!(check_success("x", Message::new().kv("success", "yes")).is_ok());
        assert!(check_success("x", Message::new()).is_err());
    }
}
