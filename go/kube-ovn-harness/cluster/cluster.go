// Package cluster reads the cluster a simulated node belongs to from a kubectl-style YAML file
// (documents separated by "---", or a `kind: List`) — the same file the eBPF agent reads with
// `--source file:PATH` — and serves it through the client-go listers kube-ovn-cni's gateway pass
// reads (Nodes, Pods, Services, Subnets, and the empty Vlan/ProviderNetwork/OvnEip listers the
// rest of its controller holds).
package cluster

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	kubeovnv1 "github.com/kubeovn/kube-ovn/pkg/apis/kubeovn/v1"
	kubeovnlister "github.com/kubeovn/kube-ovn/pkg/client/listers/kubeovn/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	listerv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/yaml"
)

// Objects are the cluster objects kube-ovn-cni's gateway pass reads.
type Objects struct {
	Nodes    []*corev1.Node
	Pods     []*corev1.Pod
	Services []*corev1.Service
	Subnets  []*kubeovnv1.Subnet
	// Ignored counts the documents of kinds the gateway pass does not read (Endpoints, Vpc, ...),
	// by "apiVersion/kind".
	Ignored map[string]int
}

// Load reads and parses the file at path.
func Load(path string) (*Objects, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	objs, err := Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return objs, nil
}

// Parse reads every document of a kubectl-style YAML stream. An object of a kind the gateway
// pass reads that does not decode is an error; so is a document without apiVersion/kind.
func Parse(r io.Reader) (*Objects, error) {
	objs := &Objects{Ignored: map[string]int{}}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	for i := 1; ; i++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		if err := objs.add(doc); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
	}
}

// stripComments drops whole-line comments, so a document of comments only counts as empty.
func stripComments(doc []byte) []byte {
	var out []byte
	for line := range bytes.Lines(doc) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			out = append(out, line...)
		}
	}
	return out
}

func (o *Objects) add(doc []byte) error {
	var meta metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return err
	}
	if meta.APIVersion == "" || meta.Kind == "" {
		return errors.New("object without apiVersion or kind")
	}
	switch meta.APIVersion + " " + meta.Kind {
	case "v1 List":
		var list struct {
			Items []runtime.RawExtension `json:"items"`
		}
		if err := yaml.Unmarshal(doc, &list); err != nil {
			return err
		}
		for i, item := range list.Items {
			if err := o.add(item.Raw); err != nil {
				return fmt.Errorf("List item %d: %w", i, err)
			}
		}
	case "v1 Node":
		return decode(doc, &o.Nodes)
	case "v1 Pod":
		return decode(doc, &o.Pods)
	case "v1 Service":
		return decode(doc, &o.Services)
	case "kubeovn.io/v1 Subnet":
		return decode(doc, &o.Subnets)
	default:
		o.Ignored[meta.APIVersion+"/"+meta.Kind]++
	}
	return nil
}

func decode[T any](doc []byte, into *[]*T) error {
	obj := new(T)
	if err := yaml.Unmarshal(doc, obj); err != nil {
		return err
	}
	*into = append(*into, obj)
	return nil
}

// Listers serve the objects the way kube-ovn-cni's informers would.
type Listers struct {
	Nodes            listerv1.NodeLister
	Pods             listerv1.PodLister
	Services         listerv1.ServiceLister
	Subnets          kubeovnlister.SubnetLister
	Vlans            kubeovnlister.VlanLister
	ProviderNetworks kubeovnlister.ProviderNetworkLister
	OvnEips          kubeovnlister.OvnEipLister
}

// Listers indexes the objects. Two objects with the same namespace/name are an error, as the API
// server would not hold both.
func (o *Objects) Listers() (*Listers, error) {
	nodes, err := index(o.Nodes)
	if err != nil {
		return nil, fmt.Errorf("Node: %w", err)
	}
	pods, err := index(o.Pods)
	if err != nil {
		return nil, fmt.Errorf("Pod: %w", err)
	}
	services, err := index(o.Services)
	if err != nil {
		return nil, fmt.Errorf("Service: %w", err)
	}
	subnets, err := index(o.Subnets)
	if err != nil {
		return nil, fmt.Errorf("Subnet: %w", err)
	}
	empty := func() cache.Indexer {
		return cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	}
	return &Listers{
		Nodes:            listerv1.NewNodeLister(nodes),
		Pods:             listerv1.NewPodLister(pods),
		Services:         listerv1.NewServiceLister(services),
		Subnets:          kubeovnlister.NewSubnetLister(subnets),
		Vlans:            kubeovnlister.NewVlanLister(empty()),
		ProviderNetworks: kubeovnlister.NewProviderNetworkLister(empty()),
		OvnEips:          kubeovnlister.NewOvnEipLister(empty()),
	}, nil
}

func index[T any](objs []*T) (cache.Indexer, error) {
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{
		cache.NamespaceIndex: cache.MetaNamespaceIndexFunc,
	})
	for _, obj := range objs {
		key, err := cache.MetaNamespaceKeyFunc(obj)
		if err != nil {
			return nil, err
		}
		if _, exists, _ := idx.GetByKey(key); exists {
			return nil, fmt.Errorf("%q appears twice", key)
		}
		if err := idx.Add(obj); err != nil {
			return nil, err
		}
	}
	return idx, nil
}
