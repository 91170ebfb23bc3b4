package testutil

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// ChromiumPath returns the headless browser that browser tests drive:
// $RTM_CHROMIUM if set, else the first of chromium, chromium-browser,
// google-chrome on PATH, or "" when there is none. CI installs Debian's
// chromium and sets RTM_REQUIRE_BROWSER (.ci/run), so there the browser
// tests never skip.
func ChromiumPath() string {
	if p := os.Getenv("RTM_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// Browser is one tab of a headless Chromium started for a test, with every
// console message, uncaught exception and browser log entry of its pages
// recorded. It is closed when the test ends.
type Browser struct {
	ctx  context.Context
	mu   sync.Mutex
	msgs []chromedp.ConsoleMessage
}

// NewBrowser starts Chromium with a window of width x height pixels. It
// skips the test, saying why, only when no browser binary is installed (and
// RTM_REQUIRE_BROWSER is unset); any other failure to start fails the test.
func NewBrowser(t testing.TB, width, height int) *Browser {
	t.Helper()
	path := ChromiumPath()
	if path == "" {
		msg := "no chromium binary on PATH (apt-get install chromium, or set RTM_CHROMIUM): the browser test cannot run"
		if os.Getenv("RTM_REQUIRE_BROWSER") != "" {
			t.Fatal(msg + "; RTM_REQUIRE_BROWSER is set (CI), so this is a failure")
		}
		t.Skip(msg)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		// Tests run as root in CI containers, where Chromium's sandbox
		// cannot start; the pages are the test's own.
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.WindowSize(width, height),
	)
	// A hung browser must not hold the test until the package timeout.
	base, cancelBase := context.WithTimeout(context.Background(), 3*time.Minute)
	alloc, cancelAlloc := chromedp.NewExecAllocator(base, opts...)
	ctx, cancelTab := chromedp.NewContext(alloc)
	b := &Browser{ctx: ctx}

	// Console starts the browser and subscribes before any page loads, so
	// no message of the test's pages is missed.
	msgs := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range msgs {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.msgs = append(b.msgs, m)
			b.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // waits for the browser process to exit
		cancelBase()
		<-done
	})
	// Fail here, not in the first action, when the browser cannot start.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start %s: %v", path, err)
	}
	return b
}

// Context is the tab's context, for chromedp.Run and chromedp.Do.
func (b *Browser) Context() context.Context { return b.ctx }

// Do runs the actions in the tab and fails the test on an error.
func (b *Browser) Do(t testing.TB, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(b.ctx, actions...); err != nil {
		t.Fatalf("browser: %v", err)
	}
}

// WaitTrue polls the JavaScript expression until it is truthy, and fails
// the test with what is message when timeout passes first.
func (b *Browser) WaitTrue(t testing.TB, expr string, timeout time.Duration, what string) {
	t.Helper()
	if _, err := chromedp.Run(b.ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(timeout))); err != nil {
		t.Fatalf("waiting %v for %s (%s): %v; console: %v", timeout, what, expr, err, b.Messages())
	}
}

// Messages returns every console message and exception so far.
func (b *Browser) Messages() []chromedp.ConsoleMessage {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]chromedp.ConsoleMessage(nil), b.msgs...)
}

// Errors returns the console errors (console.error calls and browser log
// entries of level error, such as a failed request or a refused script)
// and the uncaught exceptions so far.
func (b *Browser) Errors() []chromedp.ConsoleMessage {
	var errs []chromedp.ConsoleMessage
	for _, m := range b.Messages() {
		if m.Type == chromedp.ConsoleError || m.IsException() {
			errs = append(errs, m)
		}
	}
	return errs
}

// Screenshot saves a PNG of the whole page to path, creating its directory.
func (b *Browser) Screenshot(t testing.TB, path string) {
	t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}
