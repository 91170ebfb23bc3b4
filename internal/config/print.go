package config

import (
	"bytes"
	"fmt"
	"reflect"
	"strings"
	"time"

	yamlv3 "go.yaml.in/yaml/v3"
)

// Masked returns a copy of c safe to print or log: passwords in URIs are
// hidden, and secret values are replaced whole.
func (c Config) Masked() Config {
	v := reflect.ValueOf(&c).Elem()
	for _, k := range Keys() {
		f := v.FieldByIndex(k.index)
		switch {
		case k.Secret == "uri":
			f.SetString(MaskURI(f.String()))
		case k.Secret == "value" && f.String() != "":
			f.SetString("xxxxx")
		}
	}
	return c
}

// YAML renders c as a configuration file that Load reads back to the same
// values, each key preceded by its documentation.
func (c Config) YAML() []byte {
	root := &yamlv3.Node{Kind: yamlv3.MappingNode}
	sections := map[string]*yamlv3.Node{}
	v := reflect.ValueOf(c)
	for _, k := range Keys() {
		parent := root
		name := k.Name
		if section, leaf, ok := strings.Cut(k.Name, "."); ok {
			if sections[section] == nil {
				sections[section] = &yamlv3.Node{Kind: yamlv3.MappingNode}
				root.Content = append(root.Content, &yamlv3.Node{Kind: yamlv3.ScalarNode, Value: section}, sections[section])
			}
			parent, name = sections[section], leaf
		}
		val := &yamlv3.Node{Kind: yamlv3.ScalarNode, Value: formatValue(v.FieldByIndex(k.index).Interface())}
		if val.Value == "" {
			val.Style = yamlv3.DoubleQuotedStyle
		}
		key := &yamlv3.Node{Kind: yamlv3.ScalarNode, Value: name, HeadComment: k.Doc}
		parent.Content = append(parent.Content, key, val)
	}
	var buf bytes.Buffer
	enc := yamlv3.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(root); err != nil {
		panic(err) // every node above is a plain scalar or mapping
	}
	return buf.Bytes()
}

func formatValue(v any) string {
	if d, ok := v.(time.Duration); ok {
		return d.String()
	}
	return fmt.Sprint(v)
}

// Markdown renders the table of every key: its environment variable, flag,
// default (from Defaults) and meaning. docs/configuration.md embeds it and a
// test keeps the two equal.
func Markdown() string {
	var b strings.Builder
	b.WriteString("| key | environment | flag | default | meaning |\n| --- | --- | --- | --- | --- |\n")
	def := reflect.ValueOf(Defaults())
	for _, k := range Keys() {
		flag := ""
		if k.Flag != "" {
			flag = "`--" + k.Flag + "`"
		}
		d := formatValue(def.FieldByIndex(k.index).Interface())
		if d == "" {
			d = "(empty)"
		} else {
			d = "`" + d + "`"
		}
		fmt.Fprintf(&b, "| `%s` | `%s` | %s | %s | %s |\n", k.Name, k.Env, flag, d, strings.ReplaceAll(k.Doc, "|", "\\|"))
	}
	return b.String()
}
