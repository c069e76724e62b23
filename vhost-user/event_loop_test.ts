import assert from "node:assert/strict";
import { createEventFd, drainEventFd, signalEventFd } from "../sys/event.ts";
import { closeQuietly } from "../sys/libc.ts";
import { EventLoop, type LoopPoller } from "./event_loop.ts";

/** A loop with a stop eventfd and a work eventfd, all closed afterwards. */
async function withLoop(
  pollUs: number,
  fn: (loop: EventLoop, stop: number, work: number) => void | Promise<void>,
): Promise<void> {
  const loop = new EventLoop({ pollUs });
  const stop = createEventFd(), work = createEventFd();
  try {
    await fn(loop, stop, work);
  } finally {
    loop.close();
    closeQuietly(stop);
    closeQuietly(work);
  }
}

Deno.test("EventLoop: without a poll window, pollers are never called", () =>
  withLoop(0, (loop, stop, work) => {
    let polls = 0;
    loop.addPoller({ poll: () => (polls++, false), arm: () => (polls++, false) });
    loop.watch(work, () => {
      drainEventFd(work);
      signalEventFd(stop);
    });
    signalEventFd(work);
    loop.run(stop);
    assert.equal(polls, 0);
  }));

Deno.test("EventLoop: busy-polls after an event, arms before sleeping, re-polls on late work", () =>
  withLoop(1000, (loop, stop, work) => {
    assert.equal(loop.pollUs, 1000);
    const calls: string[] = [];
    let polls = 0, arms = 0;
    const poller: LoopPoller = {
      // Busy for the first three polls, then idle; the stop comes from a late poll.
      poll: () => {
        polls++;
        calls.push("poll");
        if (polls === 12) signalEventFd(stop);
        return polls <= 3;
      },
      // The first arm finds work that came after the last poll; later ones find none, and the
      // loop would sleep: an fd event wakes it each time, so it polls again.
      arm: () => {
        arms++;
        calls.push("arm");
        if (arms > 1 && polls < 12) signalEventFd(work);
        return arms === 1;
      },
    };
    loop.addPoller(poller);
    loop.watch(work, () => drainEventFd(work));
    signalEventFd(work);
    loop.run(stop);
    // The window starts closed (no polling before the first quick wake-up), then opens.
    assert.equal(calls[0], "arm");
    assert.ok(polls >= 12, `polled ${polls} times`);
    // Work found by arm is served at once by a poll, not left for a kick that will not come.
    const firstArm = calls.indexOf("arm");
    assert.equal(calls[firstArm + 1], "poll");
    assert.ok(arms >= 2);
  }));

Deno.test("EventLoop: an fd ready at every turn does not starve the pollers", () =>
  withLoop(1000, (loop, stop, work) => {
    // The work fd is never drained (a job that goes on for many turns): polled queues, whose
    // kicks are off, must still be polled meanwhile.
    let turns = 0, polls = 0;
    loop.addPoller({ poll: () => (polls++, false), arm: () => false });
    loop.watch(work, () => {
      if (++turns === 200) signalEventFd(stop);
    });
    signalEventFd(work);
    loop.run(stop);
    assert.ok(polls >= 150, `${polls} polls in ${turns} turns of a ready fd`);
  }));

Deno.test("EventLoop: a bad poll window is refused", () => {
  assert.throws(() => new EventLoop({ pollUs: -1 }), RangeError);
  assert.throws(() => new EventLoop({ pollUs: 1.5 }), RangeError);
});

Deno.test("EventLoop: removed pollers are not called", () =>
  withLoop(1000, (loop, stop, work) => {
    let polls = 0, n = 0;
    const poller: LoopPoller = { poll: () => (polls++, false), arm: () => false };
    loop.addPoller(poller);
    loop.removePoller(poller);
    loop.watch(work, () => {
      drainEventFd(work);
      if (++n < 5) signalEventFd(work);
      else signalEventFd(stop);
    });
    signalEventFd(work);
    loop.run(stop);
    assert.equal(polls, 0);
  }));

Deno.test("EventLoop: work nobody can take now does not make the loop spin", () =>
  withLoop(1000, async (loop, stop) => {
    let polls = 0, arms = 0;
    // The driver's chains stay available but the device cannot take them (a block device out of
    // io_uring slots): arm always finds work, poll never does any.
    loop.addPoller({ poll: () => (polls++, false), arm: () => (arms++, true) });
    // Another thread stops the loop 100 ms later; a spinning loop would poll thousands of times.
    const event = new URL("../sys/event.ts", import.meta.url).href;
    const worker = new Worker(
      `data:text/javascript,${
        encodeURIComponent(`
          import { signalEventFd } from "${event}";
          self.onmessage = (e) => setTimeout(() => {
            signalEventFd(e.data);
            self.postMessage("done");
          }, 100);
        `)
      }`,
      { type: "module" },
    );
    const done = new Promise((resolve) => worker.onmessage = resolve);
    worker.postMessage(stop);
    loop.run(stop);
    await done;
    worker.terminate();
    assert.ok(polls < 20, `${polls} polls, ${arms} arms in 100 ms`);
    assert.ok(arms >= 2, "armed again before sleeping");
  }));

Deno.test("EventLoop: events that come just after the window close it instead of keeping it open", () =>
  withLoop(1000, (loop, stop, work) => {
    // Another thread signals `work` 20 times 0.2 ms apart, which opens the 1 ms window, then about
    // every 1.1 ms: longer than the window, shorter than twice it. Polling catches none of the
    // later events, so it must stop. (Judged by the sleep alone, short after a full window, the
    // window stayed open and polled a full millisecond before every event.)
    const quick = 20, slow = 60;
    let polls = 0, seen = 0, pollsBeforeSlow = -1;
    loop.addPoller({ poll: () => (polls++, false), arm: () => false });
    loop.watch(work, () => {
      // Counted by handler calls: two signals between drains make one.
      drainEventFd(work);
      if (++seen === quick) pollsBeforeSlow = polls;
    });
    const event = new URL("../sys/event.ts", import.meta.url).href;
    const worker = new Worker(
      `data:text/javascript,${
        encodeURIComponent(`
          import { signalEventFd } from "${event}";
          self.onmessage = (e) => {
            const pause = new Int32Array(new SharedArrayBuffer(4));
            for (let i = 0; i < ${quick + slow}; i++) {
              Atomics.wait(pause, 0, 0, i < ${quick} ? 0.2 : 1.1);
              signalEventFd(e.data.work);
            }
            Atomics.wait(pause, 0, 0, 1.5);
            signalEventFd(e.data.stop);
          };
        `)
      }`,
      { type: "module" },
    );
    worker.postMessage({ work, stop });
    loop.run(stop);
    worker.terminate();
    assert.ok(pollsBeforeSlow >= 0, `only ${seen} wake-ups for ${quick} quick events`);
    // Polling a full window before each slow event would be hundreds of polls per event.
    const slowPolls = polls - pollsBeforeSlow;
    assert.ok(slowPolls < slow * 20, `${slowPolls} polls for ${slow} events 1.1 ms apart`);
  }));
