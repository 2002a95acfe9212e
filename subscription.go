package jobwatch

import (
	"log/slog"
	"sync"
)

// Subscription is one callback subscribed to one channel of a Listener. It
// has a goroutine and an unbounded queue of its own, so that the
// Listener's goroutine, which only enqueues, never waits for a callback.
type Subscription struct {
	channel  string
	callback func(Notification)
	log      *slog.Logger

	mu      sync.Mutex
	queue   []Notification
	stopped bool
	signal  chan struct{} // buffered(1): the queue has something
	done    chan struct{} // closed when the delivery goroutine exits
}

func newSubscription(channel string, callback func(Notification), log *slog.Logger) *Subscription {
	s := &Subscription{
		channel:  channel,
		callback: callback,
		log:      log,
		signal:   make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	go s.deliver()
	return s
}

// Channel returns the channel the subscription listens on.
func (s *Subscription) Channel() string { return s.channel }

func (s *Subscription) enqueue(n Notification) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return
	}
	s.queue = append(s.queue, n)
	s.mu.Unlock()
	select {
	case s.signal <- struct{}{}:
	default:
	}
}

func (s *Subscription) stop() {
	s.mu.Lock()
	s.stopped = true
	s.queue = nil
	s.mu.Unlock()
	select {
	case s.signal <- struct{}{}:
	default:
	}
}

// deliver runs the callback for each queued notification, in order. A
// delivered notification is released at once, and a queue that grew
// large in a backlog is not kept for later: what a stalled callback piled
// up is freed once it has been delivered.
func (s *Subscription) deliver() {
	defer close(s.done)
	var batch, spare []Notification
	for range s.signal {
		for {
			s.mu.Lock()
			if s.stopped {
				s.mu.Unlock()
				return
			}
			batch, s.queue = s.queue, spare
			s.mu.Unlock()
			for i := range batch {
				s.call(batch[i])
				batch[i] = Notification{}
				if s.isStopped() {
					return
				}
			}
			// The queue now has the spare's array: the batch's is the
			// next spare, never both.
			spare = batch[:0]
			if cap(spare) > maxSpareQueue {
				spare = nil
			}
			if len(batch) == 0 {
				break
			}
		}
	}
}

// maxSpareQueue is the largest queue a subscription keeps for reuse.
const maxSpareQueue = 1024

func (s *Subscription) isStopped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopped
}

func (s *Subscription) call(n Notification) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("jobwatch: listener callback panicked", "channel", s.channel, "panic", r)
		}
	}()
	s.callback(n)
}
