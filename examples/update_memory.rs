//! How much heap a parsed message holds while it waits in the writers' queue: parses the
//! benchmark's two payload shapes 1,000 times each under a counting allocator and prints the
//! bytes per update. `cargo run --release --example update_memory`
//!
//! A queued message is mostly its `Update`, so this is what `INGEST_QUEUE_CAPACITY` and
//! `INGEST_BATCH_MAX_MESSAGES` cost per message (plus the allocator's own overhead).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use mqtt_ingest::intake::model::{DeviceUuid, TopicKind, Update};
use mqtt_ingest::intake::payload::{Rules, process};

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const COUNT: usize = 1000;

fn main() {
    let rules = Rules::default();
    let shapes = [
        (
            "sensors array + status",
            r#"{"sensors":[{"sensor_name":"seq","value":4},{"sensor_name":"temperature","value":21.5,"unit":"°C"}],"status":{"rssi":-50}}"#,
        ),
        ("flat", r#"{"seq":3,"humidity":60}"#),
    ];
    for (name, payload) in shapes {
        let mut kept: Vec<Update> = Vec::with_capacity(COUNT);
        let before = LIVE.load(Ordering::Relaxed);
        for _ in 0..COUNT {
            let accepted = process(
                TopicKind::Data,
                DeviceUuid::parse("bench-dev-1234").expect("a valid id"),
                payload.as_bytes(),
                chrono::Utc::now(),
                &rules,
            )
            .expect("the benchmark's payloads are valid");
            kept.push(accepted.update);
        }
        let heap = (LIVE.load(Ordering::Relaxed) - before) / COUNT as isize;
        println!(
            "{name}: {heap} bytes of heap per update, plus {} inline",
            std::mem::size_of::<Update>()
        );
        drop(kept);
    }
}
