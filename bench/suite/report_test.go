package main

import (
	"encoding/xml"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestUpdateMarkdownKeepsTheRest: make bench rewrites only its section.
func TestUpdateMarkdownKeepsTheRest(t *testing.T) {
	p := filepath.Join(t.TempDir(), "B.md")
	orig := "# B\n\nintro\n\n" + beginMarker + "\n\nold\n\n" + endMarker + "\n\n## Other\n\nkept\n"
	if err := os.WriteFile(p, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateMarkdown(p, []byte("new section\n")); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	got := string(b)
	if strings.Contains(got, "old") || !strings.Contains(got, "new section") || !strings.HasPrefix(got, "# B\n\nintro") || !strings.HasSuffix(got, "## Other\n\nkept\n") {
		t.Fatalf("got:\n%s", got)
	}
}

// TestBarChartIsSVG: the chart parses as XML and names every series and
// group, escaped.
func TestBarChartIsSVG(t *testing.T) {
	svg := barChart("a <title>", []string{"fan-in & out", "b"}, []string{"rtm", "Mosquitto"}, [][]float64{{1, 2}, {0, 3.5}})
	d := xml.NewDecoder(strings.NewReader(svg))
	for {
		_, err := d.Token()
		if err != nil {
			if err.Error() != "EOF" {
				t.Fatalf("%v\n%s", err, svg)
			}
			break
		}
	}
	for _, want := range []string{"a &lt;title&gt;", "fan-in &amp; out", "Mosquitto", ">3.50<"} {
		if !strings.Contains(svg, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
}
