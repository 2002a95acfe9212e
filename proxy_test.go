package jobwatch_test

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// proxy is a TCP proxy in front of the test server that can refuse new
// connections, cut the ones it carries, or black-hole them (keep them open
// but stop forwarding, as a firewall or a failed-over host does).
type proxy struct {
	t       *testing.T
	ln      net.Listener
	network string
	target  string
	config  *pgx.ConnConfig // the test database, through the proxy

	mu       sync.Mutex
	accepted int // connections accepted, refused ones included
	refuse   bool
	holeNew  bool // new connections are black-holed
	conns    []*proxied
	stopped  bool
	wg       sync.WaitGroup
}

type proxied struct {
	client, server net.Conn
	mu             sync.Mutex
	holed          bool
}

// newProxy starts a proxy to the server of url and returns it with a
// connection config for the same database through the proxy.
func newProxy(t *testing.T, url string) (*proxy, *pgx.ConnConfig) {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	require.NoError(t, err)
	network, target := "tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	if len(cfg.Host) > 0 && cfg.Host[0] == '/' {
		network, target = "unix", fmt.Sprintf("%s/.s.PGSQL.%d", cfg.Host, cfg.Port)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{t: t, ln: ln, network: network, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	cfg.Host = "127.0.0.1"
	cfg.Port = uint16(ln.Addr().(*net.TCPAddr).Port)
	cfg.Fallbacks = nil
	cfg.TLSConfig = nil
	p.config = cfg
	return p, cfg
}

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepted++
		if p.refuse || p.stopped {
			p.mu.Unlock()
			c.Close()
			continue
		}
		s, err := net.Dial(p.network, p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		pc := &proxied{client: c, server: s, holed: p.holeNew}
		p.conns = append(p.conns, pc)
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(pc, c, s)
		go p.pipe(pc, s, c)
	}
}

func (p *proxy) pipe(pc *proxied, from, to net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32*1024)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			pc.mu.Lock()
			holed := pc.holed
			pc.mu.Unlock()
			if !holed {
				if _, werr := to.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			if err != io.EOF {
				from.Close()
			}
			to.Close()
			return
		}
	}
}

// setRefuse makes the proxy close new connections at once (true) or
// forward them again (false).
func (p *proxy) setRefuse(refuse bool) {
	p.mu.Lock()
	p.refuse = refuse
	p.mu.Unlock()
}

// cut closes every connection the proxy carries.
func (p *proxy) cut() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.client.Close()
		c.server.Close()
	}
}

// blackhole stops forwarding on every connection the proxy carries now,
// without closing them; new connections are forwarded normally.
func (p *proxy) blackhole() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		c.holed = true
		c.mu.Unlock()
	}
	p.t.Cleanup(func() {
		for _, c := range conns {
			c.client.Close()
			c.server.Close()
		}
	})
}

func (p *proxy) close() {
	p.mu.Lock()
	p.stopped = true
	conns := p.conns
	p.mu.Unlock()
	p.ln.Close()
	for _, c := range conns {
		c.client.Close()
		c.server.Close()
	}
	p.wg.Wait()
}

// connections returns how many connections the proxy has accepted.
func (p *proxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// blackholeNew makes the proxy accept new connections and never forward
// them: a server that takes connections and never answers.
func (p *proxy) blackholeNew() {
	p.mu.Lock()
	p.holeNew = true
	p.mu.Unlock()
}
