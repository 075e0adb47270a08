//! WebSocket frames: the input is sent as one text frame on an authenticated connection. The gateway must answer
//! with JSON (a reply or an error frame) or close with a documented code; never drop the socket without a close
//! frame. The connection is kept across inputs and opened again when the gateway closed it.
#![no_main]

use std::sync::Mutex;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Close codes the API documents (docs/api.md).
const DOCUMENTED: [u16; 9] = [1000, 1001, 1008, 1009, 1011, 1013, 4001, 4008, 4009];

static CONN: Mutex<Option<Ws>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let h = ferry_fuzz::harness();
    let mut slot = CONN.lock().unwrap();
    h.rt.block_on(async {
        if slot.is_none() {
            let url = format!("ws://{}/v1/ws?token={}", h.addr, h.token);
            let (ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("upgrade");
            *slot = Some(ws);
        }
        let ws = slot.as_mut().unwrap();
        if ws.send(Message::text(text)).await.is_err() {
            *slot = None;
            return;
        }
        // Read until the reply, a close, or a quiet moment (frames with no id may get no answer).
        loop {
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str())
                        .expect("frames the gateway sends are JSON");
                    if v.get("channel").is_none() {
                        return;
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    assert!(
                        DOCUMENTED.contains(&code) || code == u16::from(CloseCode::Normal),
                        "undocumented close code {code} after {text:?}"
                    );
                    *slot = None;
                    return;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    panic!("socket dropped without a close frame after {text:?}: {e}")
                }
                Ok(None) => panic!("socket ended without a close frame after {text:?}"),
            }
        }
    });
});
