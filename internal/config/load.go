package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/knadh/koanf/parsers/yaml"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/pflag"
)

// EnvPrefix starts the name of every environment variable rtm reads:
// RTM_ followed by the key in upper case with dots as underscores, e.g.
// RTM_BROKER_MQTT_ADDR for broker.mqtt_addr.
const EnvPrefix = "RTM_"

// Key describes one configuration key.
type Key struct {
	Name   string // dotted YAML path, e.g. "broker.mqtt_addr"
	Env    string // environment variable, e.g. "RTM_BROKER_MQTT_ADDR"
	Flag   string // command-line flag without dashes, "" when there is none
	Doc    string
	Secret string // "" (not secret), "uri" (password masked) or "value" (masked whole)
	index  []int  // field path in Config
	kind   reflect.Type
}

// flagKeys maps each command-line flag to its key. Flags are registered only
// on the commands whose roles read the key (see AddFlags).
var flagKeys = map[string]string{
	"data":         "data",
	"store-uri":    "store.uri",
	"log-level":    "log.level",
	"log-format":   "log.format",
	"node-name":    "broker.node_name",
	"mqtt-addr":    "broker.mqtt_addr",
	"ws-addr":      "broker.ws_addr",
	"tls-addr":     "broker.tls_addr",
	"wss-addr":     "broker.wss_addr",
	"tls-cert":     "broker.tls_cert",
	"tls-key":      "broker.tls_key",
	"admin-addr":   "broker.admin_addr",
	"capacity":     "broker.capacity",
	"auth-devices": "auth.devices",

	"gossip-addr":    "cluster.gossip_addr",
	"advertise-host": "cluster.advertise_host",
	"join":           "cluster.join",
	"cluster-secret": "cluster.secret",
	"link-addr":      "cluster.link_addr",
}

// keyFlags names the flags of keys whose flag name is shared by several
// roles (each role's HTTP listen address is --addr). Commands register them
// by key (AddFlags(fs, base, "router.addr")), and the flag is annotated
// with its key so Load knows which one it sets.
var keyFlags = map[string]string{
	"router.addr":      "addr",
	"pushapi.addr":     "addr",
	"pushapi.api_keys": "api-key",
	"watchdog.addr":    "addr",
}

// flagKeyAnnotation is the pflag annotation holding a flag's key.
const flagKeyAnnotation = "rtm-config-key"

var durationType = reflect.TypeOf(time.Duration(0))

// Keys lists every configuration key in declaration order.
func Keys() []Key {
	byKey := map[string]string{}
	for f, k := range flagKeys {
		byKey[k] = f
	}
	for k, f := range keyFlags {
		byKey[k] = f
	}
	var out []Key
	var walk func(t reflect.Type, prefix string, index []int)
	walk = func(t reflect.Type, prefix string, index []int) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := prefix + f.Tag.Get("koanf")
			idx := append(append([]int{}, index...), i)
			if f.Type.Kind() == reflect.Struct && f.Type != durationType {
				walk(f.Type, name+".", idx)
				continue
			}
			out = append(out, Key{
				Name:   name,
				Env:    EnvPrefix + strings.ToUpper(strings.ReplaceAll(name, ".", "_")),
				Flag:   byKey[name],
				Doc:    f.Tag.Get("doc"),
				Secret: f.Tag.Get("secret"),
				index:  idx,
				kind:   f.Type,
			})
		}
	}
	walk(reflect.TypeOf(Config{}), "", nil)
	return out
}

// Source says where Load reads configuration from, besides the defaults.
type Source struct {
	File  string         // YAML file; "" reads none
	Env   []string       // "NAME=value" pairs, usually os.Environ()
	Flags *pflag.FlagSet // only flags the user set are applied; nil reads none
}

// Load layers the file, the environment and the flags of src over base, in
// that order, then validates the result. Every problem is reported at once,
// each naming its key, its value and where the value came from.
func Load(base Config, src Source) (Config, error) {
	cfg := base
	keys := Keys()
	known := map[string]Key{}
	byEnv := map[string]Key{}
	for _, k := range keys {
		known[k.Name] = k
		byEnv[k.Env] = k
	}
	var errs []error
	origins := map[string]string{}
	set := func(k Key, v any, origin string) {
		if err := assign(&cfg, k, v); err != nil {
			errs = append(errs, &FieldError{Key: k.Name, Value: v, Origin: origin, Why: err.Error()})
			return
		}
		origins[k.Name] = origin
	}

	if src.File != "" {
		ko := koanf.New(".")
		if err := ko.Load(file.Provider(src.File), yaml.Parser()); err != nil {
			return base, fmt.Errorf("config file %s: %w", src.File, err)
		}
		names := ko.Keys()
		sort.Strings(names)
		for _, name := range names {
			k, ok := known[name]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown key (in %s)", name, src.File))
				continue
			}
			set(k, ko.Get(name), src.File)
		}
	}
	for _, kv := range src.Env {
		name, v, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(name, EnvPrefix) {
			continue
		}
		// Unknown RTM_ variables are left alone: tests and tools share the prefix.
		if k, ok := byEnv[name]; ok {
			set(k, v, "environment "+name)
		}
	}
	if src.Flags != nil {
		src.Flags.Visit(func(f *pflag.Flag) {
			if a := f.Annotations[flagKeyAnnotation]; len(a) == 1 {
				set(known[a[0]], f.Value.String(), "flag --"+f.Name)
			} else if name, ok := flagKeys[f.Name]; ok {
				set(known[name], f.Value.String(), "flag --"+f.Name)
			}
		})
	}
	if err := cfg.Validate(); err != nil {
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			if fe, ok := e.(*FieldError); ok {
				fe.Origin = origins[fe.Key]
			}
			errs = append(errs, e)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return base, err
	}
	return cfg, nil
}

// FromEnvironment is the usual Source: the given file, this process's
// environment and the given flags.
func FromEnvironment(path string, fs *pflag.FlagSet) Source {
	return Source{File: path, Env: os.Environ(), Flags: fs}
}

// AddFlags registers the named flags on fs, documented from the keys and
// defaulted from base, so --help shows what the command will really use.
func AddFlags(fs *pflag.FlagSet, base Config, names ...string) {
	keys := map[string]Key{}
	for _, k := range Keys() {
		keys[k.Name] = k
	}
	for _, f := range names {
		name, ok := flagKeys[f]
		if flag, byKey := keyFlags[f]; byKey {
			name, f, ok = f, flag, true
		}
		if !ok {
			panic("config: no key for flag --" + f)
		}
		k := keys[name]
		def := reflect.ValueOf(base).FieldByIndex(k.index)
		usage := fmt.Sprintf("%s (%s, %s)", k.Doc, k.Name, k.Env)
		switch {
		case k.kind == durationType:
			fs.Duration(f, time.Duration(def.Int()), usage)
		case k.kind.Kind() == reflect.Int:
			fs.Int(f, int(def.Int()), usage)
		default:
			fs.String(f, def.String(), usage)
		}
		_ = fs.SetAnnotation(f, flagKeyAnnotation, []string{name})
	}
}

func quote(v any) string {
	if s, ok := v.(string); ok {
		return strconv.Quote(s)
	}
	return fmt.Sprintf("%v", v)
}

// assign converts v, a YAML value or a string from the environment or a
// flag, to the type of k's field and stores it in cfg.
func assign(cfg *Config, k Key, v any) error {
	field := reflect.ValueOf(cfg).Elem().FieldByIndex(k.index)
	switch {
	case k.kind == durationType:
		s, ok := v.(string)
		if !ok {
			return errors.New("want a duration with a unit, e.g. 30s, 5m or 2h")
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return errors.New("want a duration with a unit, e.g. 30s, 5m or 2h")
		}
		field.SetInt(int64(d))
	case k.kind.Kind() == reflect.Int:
		var n int64
		switch x := v.(type) {
		case int:
			n = int64(x)
		case int64:
			n = x
		case uint64:
			n = int64(x)
		case float64:
			if x != float64(int64(x)) {
				return errors.New("want a whole number")
			}
			n = int64(x)
		case string:
			var err error
			if n, err = strconv.ParseInt(strings.TrimSpace(x), 10, 64); err != nil {
				return errors.New("want a whole number")
			}
		default:
			return errors.New("want a whole number")
		}
		field.SetInt(n)
	case k.kind.Kind() == reflect.String:
		switch x := v.(type) {
		case string:
			field.SetString(x)
		case int, int64, uint64, float64, bool:
			field.SetString(fmt.Sprint(x))
		default:
			return errors.New("want a string")
		}
	default:
		return fmt.Errorf("unsupported type %s", k.kind)
	}
	return nil
}
