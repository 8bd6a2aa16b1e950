//go:build kovnharness

// This file is kube-ovn-ebpf's, not Kube-OVN's: `cargo xtask kube-ovn build` copies it into a
// copy of Kube-OVN's module source (pkg/daemon), so the harness calls kube-ovn-cni's own,
// unexported gateway functions — not a transcription of them.

package daemon

import (
	"errors"
	"fmt"
	"os"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"kube-ovn-ebpf/go/kube-ovn-harness/cluster"

	"github.com/kubeovn/kube-ovn/pkg/util"
)

// HarnessOptions are the kube-ovn-cni flags the gateway pass reads, plus the cluster file.
type HarnessOptions struct {
	ClusterFile string
	NodeName    string
	// Protocol overrides the family choice NewController makes from the node's join-IP
	// annotation (ovn.kubernetes.io/ip_address); "" keeps Kube-OVN's choice.
	Protocol              string
	ServiceClusterIPRange string
	ClusterRouter         string
	EnableTProxy          bool
	NodeIPv4, NodeIPv6    string
	// PreroutingDatapath is the flag of contrib/kube-ovn's patch; only a patched build takes it.
	PreroutingDatapath string
}

// Harness is a kube-ovn-cni Controller with the listers fed from the cluster file and the
// iptables/ipset handles initRuntime makes — and nothing that needs OVS, D-Bus or an API server.
type Harness struct {
	c    *Controller
	opts HarnessOptions
	// The cluster file's modification time and size when last loaded.
	stamp [2]int64
}

// NewHarness loads the cluster file and builds the controller.
func NewHarness(opts HarnessOptions) (*Harness, error) {
	config := &Configuration{
		NodeName:              opts.NodeName,
		ServiceClusterIPRange: opts.ServiceClusterIPRange,
		ClusterRouter:         opts.ClusterRouter,
		EnableTProxy:          opts.EnableTProxy,
		NodeIPv4:              opts.NodeIPv4,
		NodeIPv6:              opts.NodeIPv6,
	}
	if err := harnessConfigure(config, opts); err != nil {
		return nil, err
	}
	h := &Harness{c: &Controller{config: config}, opts: opts}
	if _, err := h.reload(); err != nil {
		return nil, err
	}
	c := h.c
	node, err := c.nodesLister.Get(opts.NodeName)
	if err != nil {
		return nil, fmt.Errorf("node %q: %w", opts.NodeName, err)
	}
	// As NewController: the families are those of the node's join IP.
	c.protocol = util.CheckProtocol(node.Annotations[util.IPAddressAnnotation])
	if opts.Protocol != "" {
		c.protocol = opts.Protocol
	}
	if c.protocol == "" {
		return nil, fmt.Errorf("node %q has no %s annotation and no protocol was given", opts.NodeName, util.IPAddressAnnotation)
	}
	if config.NodeIPv4 == "" && config.NodeIPv6 == "" {
		config.NodeIPv4, config.NodeIPv6 = util.GetNodeInternalIP(*node)
	}

	if err := harnessRuntime(c); err != nil {
		return nil, err
	}
	return h, nil
}

// Protocol is the family choice in force (IPv4, IPv6 or Dual).
func (h *Harness) Protocol() string { return h.c.protocol }

// reload re-reads the cluster file when it changed; a file that does not load leaves the last
// good objects in place (as a watch that fails keeps the informers' caches).
func (h *Harness) reload() (bool, error) {
	info, err := os.Stat(h.opts.ClusterFile)
	if err != nil {
		return false, err
	}
	stamp := [2]int64{info.ModTime().UnixNano(), info.Size()}
	if stamp == h.stamp {
		return false, nil
	}
	objs, err := cluster.Load(h.opts.ClusterFile)
	if err != nil {
		return false, err
	}
	// kube-ovn-cni's pod informer only sees this node's pods that are not host-network (field
	// selector "spec.nodeName=<node>,spec.hostNetwork=false", cmd/daemon/cniserver.go).
	objs.Pods = slices.DeleteFunc(objs.Pods, func(p *corev1.Pod) bool {
		return p.Spec.NodeName != h.opts.NodeName || p.Spec.HostNetwork
	})
	l, err := objs.Listers()
	if err != nil {
		return false, err
	}
	c := h.c
	c.nodesLister, c.podsLister, c.subnetsLister = l.Nodes, l.Pods, l.Subnets
	harnessServices(c, l)
	c.vlansLister, c.providerNetworksLister, c.ovnEipsLister = l.Vlans, l.ProviderNetworks, l.OvnEips
	h.stamp = stamp
	return true, nil
}

// Pass is the iptables/ipset part of runGateway, in its order: setIPSet, setIptables, gcIPSet.
// runGateway only logs the first two's errors and goes on; Pass does the same and returns them.
// (setPolicyRouting, the bandwidth, IC and external-gateway steps drive routes and OVS, not
// netfilter, and are not run.)
func (h *Harness) Pass() (reloaded bool, err error) {
	reloaded, err = h.reload()
	if err != nil {
		err = fmt.Errorf("cluster file: %w", err)
	}
	if e := h.c.setIPSet(); e != nil {
		err = errors.Join(err, fmt.Errorf("setIPSet: %w", e))
	}
	if e := h.c.setIptables(); e != nil {
		err = errors.Join(err, fmt.Errorf("setIptables: %w", e))
	}
	h.c.gcIPSet()
	return reloaded, err
}
