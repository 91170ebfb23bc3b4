package plugins

import (
	"errors"
	"fmt"
	"strings"
)

// An aclRule is one rule of auth.acl: allow|deny pub|sub|all FILTER.
type aclRule struct {
	text   string // as written, for logs and errors
	allow  bool
	pub    bool // applies to publishes
	sub    bool // applies to subscriptions and deliveries
	levels []ruleLevel
}

// A ruleLevel is one level of a rule's filter.
type ruleLevel struct {
	kind  byte       // levelLiteral, levelPlus, levelHash or levelTemplate
	lit   string     // levelLiteral
	parts []tmplPart // levelTemplate: the level with %c/%u substituted, in pieces
}

const (
	levelLiteral byte = iota
	levelPlus
	levelHash
	levelTemplate
)

// A tmplPart is a literal piece of a level or a placeholder.
type tmplPart struct {
	lit string
	v   byte // 0 for a literal, 'c' for the client ID, 'u' for the username
}

// parseACL parses auth.acl: rules separated by ';', blank ones ignored. Every
// bad rule is reported, each naming the key and the rule.
func parseACL(s string) ([]aclRule, error) {
	var rules []aclRule
	var errs []error
	for _, text := range strings.Split(s, ";") {
		text = strings.TrimSpace(text)
		if text == "" {
			continue
		}
		r, err := parseRule(text)
		if err != nil {
			errs = append(errs, fmt.Errorf("auth.acl: rule %q: %w", text, err))
			continue
		}
		rules = append(rules, r)
	}
	return rules, errors.Join(errs...)
}

func parseRule(text string) (aclRule, error) {
	f := strings.Fields(text)
	if len(f) != 3 {
		return aclRule{}, errors.New("want 'allow|deny pub|sub|all FILTER'")
	}
	r := aclRule{text: text}
	switch f[0] {
	case "allow":
		r.allow = true
	case "deny":
	default:
		return aclRule{}, fmt.Errorf("%q: want allow or deny", f[0])
	}
	switch f[1] {
	case "pub":
		r.pub = true
	case "sub":
		r.sub = true
	case "all":
		r.pub, r.sub = true, true
	default:
		return aclRule{}, fmt.Errorf("%q: want pub, sub or all", f[1])
	}
	levels := strings.Split(f[2], "/")
	for i, lv := range levels {
		switch {
		case lv == "#":
			if i != len(levels)-1 {
				return aclRule{}, errors.New("'#' must be the last level")
			}
			r.levels = append(r.levels, ruleLevel{kind: levelHash})
		case lv == "+":
			r.levels = append(r.levels, ruleLevel{kind: levelPlus})
		case strings.ContainsAny(lv, "+#"):
			return aclRule{}, fmt.Errorf("level %q: a wildcard must be a whole level", lv)
		case strings.Contains(lv, "%c") || strings.Contains(lv, "%u"):
			r.levels = append(r.levels, ruleLevel{kind: levelTemplate, parts: parseTemplate(lv)})
		default:
			r.levels = append(r.levels, ruleLevel{kind: levelLiteral, lit: lv})
		}
	}
	return r, nil
}

// parseTemplate splits a level such as "dev-%c" into its pieces.
func parseTemplate(lv string) []tmplPart {
	var parts []tmplPart
	lit := 0
	for i := 0; i+1 < len(lv); i++ {
		if lv[i] != '%' || (lv[i+1] != 'c' && lv[i+1] != 'u') {
			continue
		}
		if lit < i {
			parts = append(parts, tmplPart{lit: lv[lit:i]})
		}
		parts = append(parts, tmplPart{v: lv[i+1]})
		i++
		lit = i + 1
	}
	if lit < len(lv) {
		parts = append(parts, tmplPart{lit: lv[lit:]})
	}
	return parts
}

// usesUsername reports whether any rule has %u.
func usesUsername(rules []aclRule) bool {
	for _, r := range rules {
		for _, lv := range r.levels {
			for _, p := range lv.parts {
				if p.v == 'u' {
					return true
				}
			}
		}
	}
	return false
}

// match reports whether r's filter, with %c and %u substituted for id,
// matches subject read as a topic: a '+' or '#' in subject (a subscription
// filter) is a literal level that only a rule wildcard matches. As in MQTT
// [MQTT-4.7.2-1], a rule starting with a wildcard does not match a subject
// starting with '$'.
func (r *aclRule) match(subject string, id *identity) bool {
	if subject != "" && subject[0] == '$' && r.levels[0].kind != levelLiteral && r.levels[0].kind != levelTemplate {
		return false
	}
	rest, done := subject, false
	for i := range r.levels {
		lv := &r.levels[i]
		if lv.kind == levelHash {
			return true // also matches the parent level: "a/#" matches "a"
		}
		if done {
			return false
		}
		var seg string
		if j := strings.IndexByte(rest, '/'); j >= 0 {
			seg, rest = rest[:j], rest[j+1:]
		} else {
			seg, done = rest, true
		}
		switch lv.kind {
		case levelLiteral:
			if seg != lv.lit {
				return false
			}
		case levelTemplate:
			if !lv.matchTemplate(seg, id) {
				return false
			}
		}
	}
	return done
}

// matchTemplate reports whether seg is the level with %c and %u substituted.
// A placeholder whose value is empty matches nothing, and one whose value
// holds a '/' never matches a single level: the substitution is per level.
func (lv *ruleLevel) matchTemplate(seg string, id *identity) bool {
	for _, p := range lv.parts {
		v := p.lit
		switch p.v {
		case 'c':
			v = id.clientID
		case 'u':
			v = id.username
		}
		if (p.v != 0 && v == "") || !strings.HasPrefix(seg, v) {
			return false
		}
		seg = seg[len(v):]
	}
	return seg == ""
}

// Decisions of the ACL, for the debug log.
const (
	reasonRule     = "acl rule"
	reasonSys      = "$SYS is the broker's own"
	reasonShare    = "$share/ is the shared-subscription prefix, not a topic"
	reasonEmpty    = "empty topic"
	reasonInbox    = "another device's inbox"
	reasonInboxPub = "only the push API publishes to inboxes"
	reasonPushPub  = "only the push API publishes to push channels"
	reasonGroups   = "groups need a store: no membership to check"
	reasonGroup    = "not a group topic: groups/{groupId}"
	reasonMember   = "not a member of the group"
)

// check decides whether device id may publish to topic (write) or subscribe
// to or receive subject, a topic filter or a topic (!write). It returns the
// rule that denied, or "" if allowed. It allocates nothing.
func (h *AuthHook) check(id *identity, subject string, write bool) (ok bool, why string) {
	if !write {
		// A shared subscription is checked as the filter it shares.
		if s, shared := strings.CutPrefix(subject, "$share/"); shared {
			j := strings.IndexByte(s, '/')
			if j < 0 {
				return false, reasonShare
			}
			subject = s[j+1:]
		}
	}
	for i := range h.rules {
		r := &h.rules[i]
		if (write && r.pub || !write && r.sub) && r.match(subject, id) {
			if r.allow {
				return true, ""
			}
			return false, r.text
		}
	}
	return builtin(id, subject, write, h.groups)
}

// builtin applies the default topic namespace of SPEC section 3 to a device;
// groups answers group membership (nil: groups are closed to devices).
func builtin(id *identity, subject string, write bool, groups Membership) (bool, string) {
	if subject == "" {
		return false, reasonEmpty
	}
	first, rest, _ := strings.Cut(subject, "/")
	if subject[0] == '$' {
		// SPEC section 3 reserves $SYS only; other $ topics are open as in
		// Mosquitto (and the Paho interoperability suites rely on
		// $TopicA/B). Wildcard rules and subscriptions starting with a
		// wildcard still never match them [MQTT-4.7.2-1]. $SYS is refused
		// in any letter case, like mochi's publish check, so "$sys/x"
		// cannot pass for the broker's statistics.
		switch {
		case strings.EqualFold(first, "$SYS"):
			return false, reasonSys
		case write && strings.EqualFold(first, "$share"):
			return false, reasonShare
		}
		return true, ""
	}
	switch first {
	case "devices":
		// devices/{id}/inbox: only the device reads it, only the push API
		// writes it. A subscription filter naming another device is refused
		// at once; a wildcard one (devices/+/inbox, #) is granted, because
		// every delivery is checked per topic, so a device only ever
		// receives its own inbox.
		who, tail, _ := strings.Cut(rest, "/")
		if tail != "inbox" {
			return true, "" // not an inbox: devices/x, devices/x/inbox/y, devices/x/+
		}
		if write {
			return false, reasonInboxPub
		}
		if who == id.clientID || who == "+" {
			return true, ""
		}
		return false, reasonInbox
	case "push":
		// push/{channel}: any device subscribes, only the push API
		// publishes. Publishing anywhere under push/ is refused, so a
		// device cannot reach push/# subscribers either.
		if write {
			return false, reasonPushPub
		}
		return true, ""
	case "groups":
		// groups/{id} and the topics under it: members only, both ways.
		// A filter with a wildcard for the group (groups/+, groups/#) is
		// granted like devices/+/inbox: every delivery is checked on its
		// topic, so it delivers only the device's own groups.
		if groups == nil {
			return false, reasonGroups
		}
		g, _, _ := strings.Cut(rest, "/")
		switch {
		case g == "" || subject == "groups":
			return false, reasonGroup
		case !write && (g == "+" || g == "#"):
			return true, ""
		case groups.Member(id.clientID, g):
			return true, ""
		}
		return false, reasonMember
	}
	return true, ""
}
