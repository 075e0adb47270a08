//! The Lua scripts, each prefixed with the shared prelude. `redis::Script` sends EVALSHA and falls back to EVAL
//! after a restart flushed the script cache.

use redis::Script;

const PRELUDE: &str = include_str!("lua/prelude.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

#[derive(Debug)]
pub struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub abandon: Script,
    pub complete: Script,
    pub fail: Script,
    pub release: Script,
    pub progress: Script,
    pub promote: Script,
    pub reclaim: Script,
    pub cancel: Script,
    pub retry_dead: Script,
    pub restore: Script,
    pub stats: Script,
    pub maintain: Script,
    /// Application channel publish with history (no prelude).
    pub publish: Script,
    /// Not prefixed by the prelude: the gateway membership touches no job keys.
    pub members: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            enqueue: script(include_str!("lua/enqueue.lua")),
            claim: script(include_str!("lua/claim.lua")),
            abandon: script(include_str!("lua/abandon.lua")),
            complete: script(include_str!("lua/complete.lua")),
            fail: script(include_str!("lua/fail.lua")),
            release: script(include_str!("lua/release.lua")),
            progress: script(include_str!("lua/progress.lua")),
            promote: script(include_str!("lua/promote.lua")),
            reclaim: script(include_str!("lua/reclaim.lua")),
            cancel: script(include_str!("lua/cancel.lua")),
            retry_dead: script(include_str!("lua/retry_dead.lua")),
            restore: script(include_str!("lua/restore.lua")),
            stats: script(include_str!("lua/stats.lua")),
            maintain: script(include_str!("lua/maintain.lua")),
            publish: Script::new(include_str!("lua/publish.lua")),
            members: Script::new(include_str!("lua/members.lua")),
        }
    }
}
